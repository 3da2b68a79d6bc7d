//! Set-up shared by the unit tests of several modules.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// A listener on a port of its own, and its address.
pub async fn listening() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("its address");
    (listener, addr)
}
