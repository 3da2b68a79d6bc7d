//! The TCP options of every connection the activator has, to clients and to replicas.

use std::time::Duration;

use std::os::fd::AsFd;

use nix::sys::socket::{setsockopt, sockopt};

/// How long a connection may be silent before the kernel probes its peer, how often
/// it probes, and how many probes go unanswered before it gives the connection up:
/// a peer gone without a FIN or reset (its node lost) is found within two minutes.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_PROBES: u32 = 6;

/// Requests and responses are small and interactive: sent at once, never held to
/// coalesce. A connection whose peer vanished is ended by the kernel's probes: an idle
/// WebSocket tunnel or pooled connection would otherwise hold its replica's slot, and
/// keep the function from going back to zero, forever.
///
/// On a listening socket, the connections it accepts take these options over from it
/// (Linux copies them at accept), so the accept path makes no system call for them.
pub fn tune(socket: &impl AsFd) {
    let _ = setsockopt(socket, sockopt::TcpNoDelay, &true);
    let idle = u32::try_from(KEEPALIVE_IDLE.as_secs()).unwrap_or(u32::MAX);
    let interval = u32::try_from(KEEPALIVE_INTERVAL.as_secs()).unwrap_or(u32::MAX);
    let _ = setsockopt(socket, sockopt::TcpKeepIdle, &idle);
    let _ = setsockopt(socket, sockopt::TcpKeepInterval, &interval);
    let _ = setsockopt(socket, sockopt::TcpKeepCount, &KEEPALIVE_PROBES);
    let _ = setsockopt(socket, sockopt::KeepAlive, &true);
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::getsockopt;
    use tokio::net::TcpStream;

    use super::*;

    fn assert_tuned(stream: &TcpStream) {
        assert!(getsockopt(stream, sockopt::KeepAlive).expect("read"));
        assert_eq!(getsockopt(stream, sockopt::TcpKeepIdle).expect("read"), 60);
        assert_eq!(
            getsockopt(stream, sockopt::TcpKeepInterval).expect("read"),
            10
        );
        assert_eq!(getsockopt(stream, sockopt::TcpKeepCount).expect("read"), 6);
        assert!(stream.nodelay().expect("read"));
    }

    #[tokio::test]
    async fn connections_probe_a_silent_peer() {
        let (_listener, addr) = crate::testing::listening().await;
        let stream = TcpStream::connect(addr).await.expect("connected");
        tune(&stream);
        assert_tuned(&stream);
    }

    #[tokio::test]
    async fn accepted_connections_take_the_listeners_options() {
        let (listener, addr) = crate::testing::listening().await;
        tune(&listener);
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        assert_tuned(&accepted.expect("accepted").0);
    }
}
