//! The TCP options of every connection the activator has, to clients and to replicas.

use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::TcpStream;

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
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let idle = u32::try_from(KEEPALIVE_IDLE.as_secs()).unwrap_or(u32::MAX);
    let interval = u32::try_from(KEEPALIVE_INTERVAL.as_secs()).unwrap_or(u32::MAX);
    let _ = setsockopt(stream, sockopt::TcpKeepIdle, &idle);
    let _ = setsockopt(stream, sockopt::TcpKeepInterval, &interval);
    let _ = setsockopt(stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES);
    let _ = setsockopt(stream, sockopt::KeepAlive, &true);
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::getsockopt;
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn connections_probe_a_silent_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let stream = TcpStream::connect(listener.local_addr().expect("its address"))
            .await
            .expect("connected");
        tune(&stream);
        assert!(getsockopt(&stream, sockopt::KeepAlive).expect("read"));
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepIdle).expect("read"), 60);
        assert_eq!(
            getsockopt(&stream, sockopt::TcpKeepInterval).expect("read"),
            10
        );
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepCount).expect("read"), 6);
        assert!(stream.nodelay().expect("read"));
    }
}
