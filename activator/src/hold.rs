//! The holding policy, free of I/O: whether one more request may wait for a function,
//! and why not.
//!
//! A held request keeps its connection and its head; its body stays with the client
//! (the activator reads a body only while forwarding it), except what the server
//! already took in: over HTTP/1.1 what the last read brought past the head, over h2c
//! what the stream's window let the client send, both at most
//! [`crate::config::read_ahead`] (64 KiB by default). So a held request costs at most
//! `min(body length, read ahead)` bytes of body, and that is what the byte bound adds
//! up — bodies of unknown length count as the whole read ahead.

/// What one held request may cost the activator's memory, at most (the 10,000-request
/// test measures it against this):
/// - the client connection's read buffer: [`crate::config::READ_BUFFER`] (8 KiB, the
///   head and what came after it). One only: a held request's head is copied out of it
///   ([`crate::headers::detach_from_read_buffer`]), or hyper's next read of the
///   connection would take a second. A head larger than that (up to
///   `--max-header-bytes`) takes a buffer, and a copy, of its size: a rare head, left
///   out here;
/// - its write buffer: 8 KiB, which hyper allocates for every HTTP/1.1 connection up
///   front. Its pages become resident only once a response is written into them
///   (jemalloc leaves them unbacked until then), so a held first request does not pay
///   for it, but a kept-alive connection held for its next request does;
/// - the connection's task (about 1 KiB: an HTTP/2 connection's larger state is boxed,
///   and only h2c clients pay for it), its timers, the parsed head, the exchange on its
///   way through the layers, the place in the queue, and the allocator's share: about
///   3 KiB measured, 4 KiB allowed;
///
/// and no body: what a held request took in of its body is counted by the queue's byte
/// bound (see the module docs).
pub const HELD_REQUEST_BYTES: usize = crate::config::READ_BUFFER + 8 * 1024 + 4 * 1024;

/// A function's queue bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBounds {
    /// Requests held at once.
    pub max_requests: usize,
    /// Body bytes held at once (see the module docs for how a request counts).
    pub max_body_bytes: u64,
}

/// What a function holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub requests: usize,
    pub body_bytes: u64,
}

/// Why a request may not wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueFull {
    #[error("{held} requests are already waiting for this function (its limit)")]
    Requests { held: usize },
    #[error(
        "{held} bytes of request bodies are already waiting for this function (its limit is {limit})"
    )]
    BodyBytes { held: u64, limit: u64 },
}

/// The body bytes a held request counts for: what the server may have taken in past
/// its head, at most the read ahead.
pub fn held_body_bytes(content_length: Option<u64>, read_ahead: usize) -> u64 {
    content_length.map_or(read_ahead as u64, |len| len.min(read_ahead as u64))
}

/// May one more request of `body_bytes` wait, with `held` already waiting?
pub fn admit(bounds: QueueBounds, held: Held, body_bytes: u64) -> Result<(), QueueFull> {
    if held.requests >= bounds.max_requests {
        return Err(QueueFull::Requests {
            held: held.requests,
        });
    }
    // A request larger than the whole bound still gets in alone, or it could never be
    // served at zero.
    if held.requests > 0 && held.body_bytes + body_bytes > bounds.max_body_bytes {
        return Err(QueueFull::BodyBytes {
            held: held.body_bytes,
            limit: bounds.max_body_bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const BOUNDS: QueueBounds = QueueBounds {
        max_requests: 3,
        max_body_bytes: 1000,
    };

    fn held(requests: usize, body_bytes: u64) -> Held {
        Held {
            requests,
            body_bytes,
        }
    }

    #[test]
    fn table() {
        let cases = [
            (held(0, 0), 0, Ok(())),
            (held(2, 0), 0, Ok(())),
            (held(3, 0), 0, Err(QueueFull::Requests { held: 3 })),
            (held(1, 600), 400, Ok(())),
            (
                held(1, 600),
                401,
                Err(QueueFull::BodyBytes {
                    held: 600,
                    limit: 1000,
                }),
            ),
            (held(0, 0), 5000, Ok(())),
        ];
        for (now, bytes, expected) in cases {
            assert_eq!(admit(BOUNDS, now, bytes), expected, "{now:?} + {bytes}");
        }
    }

    #[test]
    fn body_bytes_count_at_most_one_buffer() {
        assert_eq!(held_body_bytes(Some(10), 8192), 10);
        assert_eq!(held_body_bytes(Some(1 << 30), 8192), 8192);
        assert_eq!(held_body_bytes(None, 8192), 8192);
    }

    proptest! {
        /// Admitting requests one by one never goes past either bound, except a single
        /// oversized request alone.
        #[test]
        fn bounds_hold(sizes in proptest::collection::vec(0u64..600, 0..20)) {
            let mut now = Held::default();
            for size in sizes {
                if admit(BOUNDS, now, size).is_ok() {
                    now.requests += 1;
                    now.body_bytes += size;
                }
                prop_assert!(now.requests <= BOUNDS.max_requests);
                prop_assert!(now.requests <= 1 || now.body_bytes <= BOUNDS.max_body_bytes);
            }
        }
    }
}
