//! HTTP/1.1 to replicas, driven by the request's own task.
//!
//! hyper's client runs every connection as a task of its own and passes each request
//! and response across channels, so one exchange wakes two tasks several times. Here
//! the task serving the client writes the request's head, streams its body, reads the
//! response's head, and — through the response body the server polls — the rest: the
//! replica's answer wakes the one task that needs it. A response read whole with its
//! head gives the connection back before the client is even answered.
//!
//! What is read is framed as RFC 9112 §6 says: no body after `HEAD` or for 1xx, 204
//! and 304; `Transfer-Encoding` ending in `chunked` over `Content-Length` (and the
//! connection is not reused when both came); a body without either runs until the
//! replica closes. Interim 1xx answers are skipped. A connection is reused only when
//! its exchange ended cleanly with nothing extra read. The wait for the final head is
//! bounded, from the end of the request's body.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version,
    header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING},
    response,
};
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    io::AsyncWriteExt,
    net::TcpStream,
    sync::OwnedSemaphorePermit,
    time::{Instant, Sleep},
};

use crate::headers;

/// The most header fields a response (or its trailers) may have.
const MAX_HEADERS: usize = 100;
/// The largest response head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Room made in the read buffer when a read finds less than [`MIN_READ_ROOM`] left.
const READ_CHUNK: usize = 8 * 1024;
/// A read goes into the room the buffer has left while this much is left. Heads and
/// small bodies taken out of the buffer keep its allocation shared, so asking for a
/// whole [`READ_CHUNK`] before every read would allocate a new buffer for nearly
/// every response; this way one allocation serves tens of small responses.
const MIN_READ_ROOM: usize = 1024;
/// A connection keeps its request-head buffer up to this size; a larger head's goes.
const HEAD_BUFFER_KEPT: usize = 4 * 1024;
/// The longest chunk extension accepted (they are read and dropped).
const MAX_CHUNK_EXTENSION: u16 = 4 * 1024;

/// Why an exchange with a replica failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the replica closed the connection before answering")]
    ClosedBeforeResponse,
    #[error("the replica closed the connection mid-response")]
    Truncated,
    #[error("the replica's response is malformed: {0}")]
    Malformed(&'static str),
    #[error(
        "the replica's response has transfer coding {0:?}; only chunked is read (a body's encoding belongs in Content-Encoding)"
    )]
    UnsupportedCoding(String),
    #[error("the replica's response head is larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("reading the request body from the client: {0}")]
    ClientBody(BoxError),
    #[error("the client sent no part of the request body for {0:?}")]
    ClientBodyStalled(Duration),
    #[error("the replica did not begin its answer within {0:?} of having the whole request")]
    NoAnswerInTime(Duration),
    #[error("the replica took none of the request body for {0:?}")]
    BodyNotTaken(Duration),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request that failed; `unsent` gives it back when the replica cannot have acted on
/// it, so it may go to another HTTP/1.1 connection (once its head was written, emptied
/// of target and fields, with the head as written).
#[derive(Debug)]
pub struct SendError<B> {
    pub unsent: Option<Request<B>>,
    pub error: Error,
}

/// The head of a request as encoded for a connection that failed before the replica
/// could act on it, carried by the request (emptied of its target and fields once
/// written) to the connection that sends it again.
#[derive(Debug, Clone)]
struct WrittenHead(Vec<u8>);

/// What a replica answered.
#[derive(Debug)]
pub enum Answer {
    /// A response; its body reads the rest from the connection.
    Response(response::Parts, ResponseBody),
    /// `101 Switching Protocols`: the connection is the upgraded stream now, and
    /// `early` holds what the replica sent past the head.
    Switched(response::Parts, Upgraded),
}

#[derive(Debug)]
pub struct Upgraded {
    pub io: TcpStream,
    pub early: Bytes,
    /// Held while the tunnel lasts: it counts against the replica's connections.
    _place: Place,
}

/// One HTTP/1.1 connection to a replica: checked out of its pool for one exchange at a
/// time. Dropped, it closes.
#[derive(Debug)]
pub struct Http1Connection {
    io: TcpStream,
    /// Read from the replica and not yet consumed.
    read: BytesMut,
    /// A request went over it before: it may have been closed by the replica since.
    reused: bool,
    /// Field names this replica has sent.
    names: RememberedNames,
    /// The request head being written: one allocation for the connection's life
    /// instead of one per request.
    head: Vec<u8>,
    /// Bounds the wait for each answer. One timer for the connection's life, where a
    /// new timer per request would take the timer wheel's lock to add it and again to
    /// remove it. Idle, it still holds the waker of the last exchange's task until it
    /// fires (one spurious wake per timeout at most), which keeps that task's memory
    /// allocated meanwhile: bounded by the connections per replica.
    answer_timer: Option<Pin<Box<Sleep>>>,
    place: Place,
}

/// A connection's place under its replica's bound and in the gauge of open
/// connections, both given up when it closes.
#[derive(Debug)]
struct Place {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Http1Connection {
    /// A connection just made; `permit` is its place under the replica's bound.
    pub fn new(io: TcpStream, permit: OwnedSemaphorePermit, open: Gauge) -> Self {
        open.inc();
        Self {
            io,
            read: BytesMut::new(),
            reused: false,
            names: RememberedNames::new(),
            head: Vec::new(),
            answer_timer: None,
            place: Place {
                _permit: permit,
                open,
            },
        }
    }

    /// Whether the replica has neither closed it nor sent anything unasked. Costs no
    /// system call unless the socket became readable while idle.
    pub fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        self.read.is_empty()
            && matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Marks it as having carried a request, before it goes back to its pool.
    pub fn reused(mut self) -> Self {
        self.reused = true;
        self
    }

    /// Sends `request` (its head already in the form the replica gets) and reads the
    /// response's head, which must begin within `response_timeout` of the whole
    /// request having gone out (like Go's `ResponseHeaderTimeout`): a long upload does
    /// not count against it.
    pub async fn send<B>(
        mut self,
        mut request: Request<B>,
        response_timeout: Duration,
        body_timeout: Duration,
    ) -> Result<Answer, SendError<B>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        // The request stays whole (no parts taken out and put back): it is large, and
        // it goes back to the caller when it was not sent.
        let body_empty = request.body().is_end_stream();
        let chunked = !body_empty && !request.headers().contains_key(CONTENT_LENGTH);
        match request.extensions_mut().remove::<WrittenHead>() {
            Some(WrittenHead(head)) => self.head = head,
            None => encode_request_head(&mut self.head, &request, chunked),
        }
        let written = self.io.write_all(&self.head).await;
        if let Err(error) = written {
            return Err(self.give_back(request, error.into()));
        }
        // Written, the target and fields go now, not after the response: hyper parsed
        // them as slices of the client connection's 8 KiB read buffer, and while they
        // keep it shared, hyper's read of that connection during the wait (to notice a
        // client that leaves) takes a new buffer — an 8 KiB allocation and free per
        // request. From here only the method and the body are needed; a resend takes
        // the head as written.
        *request.uri_mut() = Uri::default();
        *request.headers_mut() = HeaderMap::new();
        let mut keep_alive = true;
        if !body_empty {
            // Boxed: inline, streaming a body (two futures raced) would make every
            // exchange's future larger, and each move of it longer, bodiless ones too.
            let limits = BodyLimits {
                client_pause: body_timeout,
                replica_stall: response_timeout,
            };
            match Box::pin(self.send_body(request.body_mut(), chunked, limits)).await {
                Ok(BodySent::Whole) => {}
                Ok(BodySent::Interrupted) => keep_alive = false,
                Err(error) => {
                    return Err(SendError {
                        unsent: None,
                        error,
                    });
                }
            }
        }
        let mut head = match self.read_final_head_within(response_timeout).await {
            Ok(head) => head,
            // A reused connection the replica closed as the request went out,
            // mostly one it had timed out as idle. It may have read the request
            // before closing, so only one without a body and of an idempotent
            // method goes again (RFC 9110 §9.2.2), whose repeat is harmless.
            Err(Error::ClosedBeforeResponse)
                if self.reused && body_empty && request.method().is_idempotent() =>
            {
                return Err(self.give_back(request, Error::ClosedBeforeResponse));
            }
            Err(error) => {
                return Err(SendError {
                    unsent: None,
                    error,
                });
            }
        };
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            let Self {
                io,
                mut read,
                place,
                ..
            } = self;
            return Ok(Answer::Switched(
                head,
                Upgraded {
                    io,
                    early: read.split().freeze(),
                    _place: place,
                },
            ));
        }
        if self.head.capacity() > HEAD_BUFFER_KEPT {
            self.head = Vec::new();
        }
        let fields = FramingFields::of(&head.headers);
        let framing = match response_framing(request.method(), &head, fields) {
            Ok(framing) => framing,
            Err(error) => {
                return Err(SendError {
                    unsent: None,
                    error,
                });
            }
        };
        // Both framings at once is how responses are smuggled: this one is read by
        // its `Transfer-Encoding`, and the connection goes no further.
        let both_framings = fields.transfer_encoding && fields.content_length;
        let replica_closes =
            fields.connection && headers::list_has(&head.headers, CONNECTION, "close");
        keep_alive &= head.version == Version::HTTP_11
            && !replica_closes
            && !matches!(framing, Framing::UntilClose)
            && !both_framings;
        if fields.content_length && matches!(framing, Framing::Chunked(_) | Framing::UntilClose) {
            // The length is the replica's framing, not the body's; the server frames
            // the body again for its client.
            head.headers.remove(CONTENT_LENGTH);
        }
        Ok(Answer::Response(
            head,
            ResponseBody {
                connection: self,
                framing,
                keep_alive,
            },
        ))
    }

    /// A request the replica cannot have acted on, given back with its head as encoded
    /// here: the head is all a resend needs, and once written the request no longer
    /// holds its target and fields. The connection is done with.
    fn give_back<B>(&mut self, mut request: Request<B>, error: Error) -> SendError<B> {
        request
            .extensions_mut()
            .insert(WrittenHead(std::mem::take(&mut self.head)));
        SendError {
            unsent: Some(request),
            error,
        }
    }

    /// Streams the request body; stops early (and the connection is not reused) if
    /// the replica answers or closes before it has all of it. Each write must be taken
    /// within `limits.replica_stall`, and each part must come from the client within
    /// `limits.client_pause`: a replica that stops reading (hung, or answering early
    /// without draining the body), or a client that stops sending, would otherwise
    /// hold the request, its slot and its connection for as long as the other waits.
    /// A replica that stops reading or closes after its whole answer came, or whose
    /// whole answer is there when the client pauses too long, gets that answer through.
    async fn send_body<B>(
        &mut self,
        body: &mut B,
        chunked: bool,
        limits: BodyLimits,
    ) -> Result<BodySent, Error>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        let Self { io, read, .. } = self;
        let stall_limit = limits.replica_stall;
        // Whether the replica's answer is still awaited while the body goes out: once
        // it began without refusing the body, it is read after.
        let mut watching = true;
        let pause = tokio::time::sleep(limits.client_pause);
        tokio::pin!(pause);
        loop {
            let frame = tokio::select! {
                biased;
                frame = body.frame() => {
                    pause.as_mut().reset(tokio::time::Instant::now() + limits.client_pause);
                    frame
                }
                () = pause.as_mut() => {
                    // The replica may have answered already (a handler that ignores the
                    // body): what it said, as a client talking to it directly would
                    // have by now, rather than a 408.
                    if answered_anyway(io, read, &mut watching) {
                        tracing::debug!("a client paused its upload after the replica's answer; the answer goes to the client");
                        return Ok(BodySent::Interrupted);
                    }
                    return Err(Error::ClientBodyStalled(limits.client_pause));
                }
                answered = answered_early(io, read), if watching => {
                    // An interim answer (a `100 Continue` to the request's `Expect`)
                    // asks for the rest of the body; a refusal, or a close, ends it.
                    if stops_the_upload(answered?, read, &mut watching) {
                        return Ok(BodySent::Interrupted);
                    }
                    continue;
                }
            };
            let frame = match frame {
                None => {
                    if chunked {
                        let mut end = &b"0\r\n\r\n"[..];
                        return sent_unless_refused(io, read, stall_limit, &mut watching, &mut end)
                            .await;
                    }
                    return Ok(BodySent::Whole);
                }
                Some(Err(e)) => return Err(Error::ClientBody(e.into())),
                Some(Ok(frame)) => frame,
            };
            let sent = match frame.into_data() {
                Ok(data) if data.is_empty() => BodySent::Whole,
                Ok(data) if chunked => {
                    let size = Bytes::from(format!("{:x}\r\n", data.len()));
                    let mut chunk = size.chain(data).chain(&b"\r\n"[..]);
                    sent_unless_refused(io, read, stall_limit, &mut watching, &mut chunk).await?
                }
                Ok(mut data) => {
                    sent_unless_refused(io, read, stall_limit, &mut watching, &mut data).await?
                }
                Err(frame) => {
                    // Trailers end the body; they can only go in a chunked one.
                    if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                        let mut trailers = &encode_trailers(&trailers)[..];
                        return sent_unless_refused(
                            io,
                            read,
                            stall_limit,
                            &mut watching,
                            &mut trailers,
                        )
                        .await;
                    }
                    BodySent::Whole
                }
            };
            if sent == BodySent::Interrupted {
                return Ok(sent);
            }
        }
    }

    /// Reads until a final (not interim) response head is parsed, for at most
    /// `timeout`.
    async fn read_final_head_within(
        &mut self,
        timeout: Duration,
    ) -> Result<response::Parts, Error> {
        let due = Instant::now() + timeout;
        // The timer is left at an earlier exchange's deadline unless that is later than
        // this one's: firing early, it is moved to `due` then (once per `timeout` under
        // steady traffic), where moving it for every exchange would cost a clock
        // conversion and an atomic operation each time.
        let mut timer = match self.answer_timer.take() {
            Some(mut timer) => {
                if timer.deadline() > due {
                    timer.as_mut().reset(due);
                }
                timer
            }
            None => Box::pin(tokio::time::sleep_until(due)),
        };
        // Polled by hand, the head first: an async read inside a `select!` adds a
        // state machine of its own to every exchange's future.
        let head = std::future::poll_fn(|cx| {
            if let Poll::Ready(head) = self.poll_final_head(cx) {
                return Poll::Ready(head);
            }
            while timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= due {
                    return Poll::Ready(Err(Error::NoAnswerInTime(timeout)));
                }
                timer.as_mut().reset(due);
            }
            Poll::Pending
        })
        .await;
        self.answer_timer = Some(timer);
        head
    }

    /// Reads until a final (not interim) response head is parsed.
    fn poll_final_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<response::Parts, Error>> {
        loop {
            if !self.read.is_empty()
                && let Some(head) = parse_response_head(&mut self.read, &mut self.names)?
            {
                if is_interim(head.status.as_u16()) {
                    continue;
                }
                return Poll::Ready(Ok(head));
            }
            if self.read.len() >= MAX_HEAD_BYTES {
                return Poll::Ready(Err(Error::HeadTooLarge));
            }
            make_room(&mut self.read);
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.read
            ));
            match read {
                Ok(0) if self.read.is_empty() => {
                    return Poll::Ready(Err(Error::ClosedBeforeResponse));
                }
                Ok(0) => return Poll::Ready(Err(Error::Truncated)),
                Ok(_) => {}
                // A reset that comes before any byte of an answer is a close, too.
                Err(e) if self.read.is_empty() && is_reset(&e) => {
                    return Poll::Ready(Err(Error::ClosedBeforeResponse));
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

/// Room for the next read (see [`MIN_READ_ROOM`]).
fn make_room(buffer: &mut BytesMut) {
    if buffer.capacity() - buffer.len() < MIN_READ_ROOM {
        buffer.reserve(READ_CHUNK);
    }
}

fn is_reset(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

#[derive(Debug, PartialEq, Eq)]
enum BodySent {
    Whole,
    Interrupted,
}

/// How long a request body may wait on either side of the activator.
#[derive(Debug, Clone, Copy)]
struct BodyLimits {
    /// For the client's next part.
    client_pause: Duration,
    /// For the replica to take a write.
    replica_stall: Duration,
}

/// A write of the request body that the replica takes within `limit`.
async fn taken_within(
    limit: Duration,
    write: impl Future<Output = io::Result<()>>,
) -> Result<(), Error> {
    match tokio::time::timeout(limit, write).await {
        Ok(written) => Ok(written?),
        Err(_) => Err(Error::BodyNotTaken(limit)),
    }
}

/// Writes `data`, each write taken within `limit` as [`taken_within`] says, unless the
/// replica refuses the body (or closes) first: a replica that answers an upload early
/// (`413`) and stops reading has that answer forwarded at once, not after the write's
/// limit. Its answer is looked at first: one that came with a reset (a replica that
/// answered and closed) is still read before the failed write is.
async fn sent_unless_refused(
    io: &TcpStream,
    read: &mut BytesMut,
    limit: Duration,
    watching: &mut bool,
    data: &mut impl Buf,
) -> Result<BodySent, Error> {
    let write = taken_within(limit, write_all_shared(io, data));
    tokio::pin!(write);
    loop {
        tokio::select! {
            biased;
            answered = answered_early(io, read), if *watching => {
                if stops_the_upload(answered?, read, watching) {
                    return Ok(BodySent::Interrupted);
                }
            }
            written = &mut write => {
                let Err(failed) = written else {
                    return Ok(BodySent::Whole);
                };
                // The replica stopped taking the body: stalled, or closed (a server
                // that answers without reading a body may close rather than drain
                // it).
                if answered_anyway(io, read, watching) {
                    tracing::debug!(error = %failed, "a replica stopped taking the body after its answer; the answer goes to the client");
                    return Ok(BodySent::Interrupted);
                }
                return Err(failed);
            }
        }
    }
}

/// Once the upload cannot go on (the replica stopped taking it, or the client stopped
/// sending it): whether the replica's answer is what the client gets instead of a
/// failure, the upload ending there and the connection not reused. It is when it
/// refuses the body, or began without refusing it and is all here; one still coming
/// may never end (its replica waits for the rest of the body) or may have been cut by
/// a close, and the failure stands. What the replica sent is read from the socket
/// first: the runtime learns that bytes wait only as it polls, and an answer and a
/// reset can come between two polls.
fn answered_anyway(io: &TcpStream, read: &mut BytesMut, watching: &mut bool) -> bool {
    let received = read_waiting(io, read);
    if *watching && received > 0 && stops_the_upload(received, read, watching) {
        return true;
    }
    !*watching && whole_answer_in(read)
}

/// Reads what the replica's connection holds now into `read`, up to
/// [`WHOLE_ANSWER_LIMIT`] bytes in all; how many. Straight from the socket, not
/// through the runtime's record of its readiness, which may not know of them yet.
fn read_waiting(io: &TcpStream, read: &mut BytesMut) -> usize {
    let fd = std::os::fd::AsRawFd::as_raw_fd(io);
    let mut part = [0u8; 8192];
    let mut received = 0;
    while read.len() < WHOLE_ANSWER_LIMIT {
        let room = (WHOLE_ANSWER_LIMIT - read.len()).min(part.len());
        match nix::sys::socket::recv(
            fd,
            &mut part[..room],
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n @ 1..) => {
                read.extend_from_slice(&part[..n]);
                received += n;
            }
            // The end, nothing more now, or a failure (after a reset, once what came
            // before it has been read).
            Ok(0) | Err(_) => break,
        }
    }
    received
}

/// Whether the replica's final answer is all in `read`: a complete head with no body
/// (`204`, `304`) or with a `Content-Length` body that is all here. An answer framed
/// by the connection's close cannot be known whole (a reset looks like its end), nor
/// is a chunked one checked: neither counts.
fn whole_answer_in(read: &BytesMut) -> bool {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Response::new(&mut fields);
    let Ok(httparse::Status::Complete(head_length)) = head.parse(read) else {
        return false;
    };
    if matches!(head.code, Some(204 | 304)) {
        return true;
    }
    if head
        .headers
        .iter()
        .any(|f| f.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return false;
    }
    let lengths = head
        .headers
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("content-length"))
        .map(|f| f.value);
    match content_length(lengths) {
        Ok(Some(length)) => (read.len() - head_length) as u64 >= length,
        _ => false,
    }
}

/// How much of a replica's answer [`read_waiting`] takes in.
const WHOLE_ANSWER_LIMIT: usize = MAX_HEAD_BYTES + 64 * 1024;

/// What the replica sent while the body goes out (`received` bytes, 0 for a close):
/// whether the upload stops. An answer that does not refuse it ends the watching.
fn stops_the_upload(received: usize, read: &mut BytesMut, watching: &mut bool) -> bool {
    if received == 0 {
        return true;
    }
    match only_interim_answers(read) {
        Early::Interim => false,
        Early::Final => true,
        Early::Answering => {
            *watching = false;
            false
        }
    }
}

/// `write_all_buf` through a shared reference, so that the connection can be read at
/// the same time (for an early answer). Vectored, as tokio's is for a socket.
async fn write_all_shared(io: &TcpStream, data: &mut impl Buf) -> io::Result<()> {
    while data.has_remaining() {
        io.writable().await?;
        let written = {
            let mut slices = [io::IoSlice::new(&[]); 4];
            let count = data.chunks_vectored(&mut slices);
            io.try_write_vectored(&slices[..count])
        };
        match written {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Resolves once the replica sends something (or closes: 0) while the request body is
/// still going out; what it sent is kept for the response.
async fn answered_early(io: &TcpStream, read: &mut BytesMut) -> io::Result<usize> {
    loop {
        io.readable().await?;
        make_room(read);
        match io.try_read_buf(read) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// An interim answer, which a final one follows: 1xx, but `101 Switching Protocols`,
/// after which the connection is no longer HTTP.
fn is_interim(status: u16) -> bool {
    (100..200).contains(&status) && status != 101
}

/// What a replica has sent while the request body still goes out.
#[derive(Debug, PartialEq, Eq)]
enum Early {
    /// Interim answers only, now taken out of the buffer, or the start of a head that
    /// may still be one: the upload goes on.
    Interim,
    /// A final answer that refuses the request (an error, `4xx`/`5xx`), a switch of
    /// protocols, or what cannot be read as an interim answer: the upload stops, and
    /// the response is read as usual.
    Final,
    /// A final answer that does not refuse it (a replica streaming both ways answers
    /// before it has read the whole body): the upload goes on, and the response is
    /// read once it is done; nothing more is read meanwhile.
    Answering,
}

/// Takes the interim answers (1xx but `101`) off the front of `read`: a replica may
/// send `100 Continue` as soon as it has the head of a request that expects it, while
/// the body is still on its way from the client (hyper's server answers the client's
/// `Expect` itself).
fn only_interim_answers(read: &mut BytesMut) -> Early {
    loop {
        if read.is_empty() {
            return Early::Interim;
        }
        // What is waiting to become a head is bounded as `read_head` bounds it: past
        // that, the upload stops, and reading the response reports it.
        if read.len() >= MAX_HEAD_BYTES {
            return Early::Final;
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut head = httparse::Response::new(&mut fields);
        let parsed = head.parse(read);
        let interim = head.code.is_some_and(is_interim);
        match parsed {
            Ok(httparse::Status::Complete(length)) if interim => read.advance(length),
            Ok(httparse::Status::Partial) if interim || head.code.is_none() => {
                return Early::Interim;
            }
            Ok(_) if head.code.is_some_and(|code| code < 400 && code != 101) => {
                return Early::Answering;
            }
            _ => return Early::Final,
        }
    }
}

/// `METHOD target HTTP/1.1`, the fields, and the framing: the client's
/// `Content-Length` (kept among the fields) or, for a body of unknown length,
/// `Transfer-Encoding: chunked`.
fn encode_request_head<B>(head: &mut Vec<u8>, request: &Request<B>, chunked: bool) {
    let target = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    head.clear();
    head.reserve(
        64 + target.len()
            + request
                .headers()
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>(),
    );
    head.extend_from_slice(request.method().as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    head.extend_from_slice(b"\r\n");
}

/// The last chunk and the trailer section.
fn encode_trailers(trailers: &HeaderMap) -> Vec<u8> {
    let mut out = b"0\r\n".to_vec();
    for (name, value) in trailers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Parses a response head at the start of `buffer` and takes it out; `None` until it
/// is all there. Field values share the head's bytes rather than being copied, and
/// names not known to `http` come from `names` (the connection's, filled as they are
/// met) rather than being copied again for every response.
fn parse_response_head(
    buffer: &mut BytesMut,
    names: &mut RememberedNames,
) -> Result<Option<response::Parts>, Error> {
    // Room for a usual head first: the arrays are cleared on every parse.
    match parse_response_head_with::<24>(buffer, names) {
        Err(Error::Malformed(TOO_MANY_FIELDS)) => {
            parse_response_head_with::<MAX_HEADERS>(buffer, names)
        }
        parsed => parsed,
    }
}

const TOO_MANY_FIELDS: &str = "too many fields";
/// The most names not known to `http` a connection remembers.
const MAX_REMEMBERED_NAMES: usize = 32;

fn parse_response_head_with<const FIELDS: usize>(
    buffer: &mut BytesMut,
    names: &mut RememberedNames,
) -> Result<Option<response::Parts>, Error> {
    let mut fields = [httparse::EMPTY_HEADER; FIELDS];
    let mut parsed = httparse::Response::new(&mut fields);
    let length = match parsed.parse(buffer) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Malformed(TOO_MANY_FIELDS)),
        Err(_) => return Err(Error::Malformed("not an HTTP/1.x status line and fields")),
    };
    let status = parsed
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Error::Malformed("invalid status code"))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where each field sits in the head, so that the values can share its bytes once
    // it is taken out of the buffer.
    let start = buffer.as_ptr() as usize;
    let mut places = [(0u32, 0u32, 0u32, 0u32); FIELDS];
    let count = parsed.headers.len();
    for (place, field) in places.iter_mut().zip(parsed.headers.iter()) {
        let name = field.name.as_ptr() as usize - start;
        let value = field.value.as_ptr() as usize - start;
        // The head is at most MAX_HEAD_BYTES long.
        *place = (
            name as u32,
            (name + field.name.len()) as u32,
            value as u32,
            (value + field.value.len()) as u32,
        );
    }
    let head = buffer.split_to(length).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &(name_start, name_end, value_start, value_end) in &places[..count] {
        let name = header_name(&head[name_start as usize..name_end as usize], names)?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
                .map_err(|_| Error::Malformed("invalid field value"))?;
        headers.append(name, value);
    }
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(parts))
}

/// Field names a connection has met, each as the replica spelled it beside the name
/// it stands for. A replica spells its names the same way on every response, so a
/// byte comparison finds them (no case folding per field).
type RememberedNames = Vec<(Box<[u8]>, HeaderName)>;

/// A field name: one this connection met before (a replica sends the same few on
/// every response), or a new one, then remembered. Making a name `http` does not know
/// copies it; a remembered one is shared.
fn header_name(raw: &[u8], names: &mut RememberedNames) -> Result<HeaderName, Error> {
    if let Some((_, known)) = names.iter().find(|(spelled, _)| **spelled == *raw) {
        return Ok(known.clone());
    }
    let name = HeaderName::from_bytes(raw).map_err(|_| Error::Malformed("invalid field name"))?;
    if names.len() < MAX_REMEMBERED_NAMES {
        names.push((raw.into(), name.clone()));
    }
    Ok(name)
}

/// How the response's body is delimited (RFC 9112 §6.3).
#[derive(Debug)]
enum Framing {
    /// Bytes still to come.
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// Which of the fields that frame a response its head has. Found in one pass over its
/// names: a response has a handful of fields, and a lookup of each of these three
/// costs more than the whole pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct FramingFields {
    transfer_encoding: bool,
    content_length: bool,
    connection: bool,
}

impl FramingFields {
    fn of(headers: &HeaderMap) -> Self {
        let mut fields = Self::default();
        for name in headers.keys() {
            if name == TRANSFER_ENCODING {
                fields.transfer_encoding = true;
            } else if name == CONTENT_LENGTH {
                fields.content_length = true;
            } else if name == CONNECTION {
                fields.connection = true;
            }
        }
        fields
    }
}

fn response_framing(
    method: &Method,
    head: &response::Parts,
    fields: FramingFields,
) -> Result<Framing, Error> {
    if method == Method::HEAD
        || head.status.is_informational()
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Done);
    }
    if fields.transfer_encoding {
        // Chunked is the one coding read here. Any other (`gzip, chunked`) would reach
        // the client decoded of its chunks only, and unlabelled, since the field is
        // the connection's: refused rather than passed on altered.
        let codings = headers::transfer_codings(&head.headers);
        if let Some(coding) = codings.other {
            return Err(Error::UnsupportedCoding(coding));
        }
        return match codings.chunked {
            0 => Ok(Framing::UntilClose),
            1 => Ok(Framing::Chunked(ChunkedDecoder::default())),
            _ => Err(Error::Malformed("chunked more than once")),
        };
    }
    if !fields.content_length {
        return Ok(Framing::UntilClose);
    }
    let length = content_length(
        head.headers
            .get_all(CONTENT_LENGTH)
            .iter()
            .map(HeaderValue::as_bytes),
    )?;
    Ok(match length {
        Some(0) => Framing::Done,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// The length the `Content-Length` fields' `values` give, if any: `5, 5` and repeated
/// equal fields are one length; anything but digits, or lengths that differ, is
/// malformed.
fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<Option<u64>, Error> {
    let mut length = None;
    for value in values {
        let value = std::str::from_utf8(value).unwrap_or("x");
        for item in value.split(',') {
            let item = item.trim();
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Error::Malformed("invalid Content-Length"));
            }
            let parsed: u64 = item
                .parse()
                .map_err(|_| Error::Malformed("invalid Content-Length"))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(Error::Malformed("conflicting Content-Length values"));
            }
            length = Some(parsed);
        }
    }
    Ok(length)
}

/// A response body read from the replica's connection as the client takes it.
#[derive(Debug)]
pub struct ResponseBody {
    connection: Http1Connection,
    framing: Framing,
    keep_alive: bool,
}

impl ResponseBody {
    /// The whole body, when it is already read (it came with the head, or there is
    /// none): the connection can go back at once.
    pub fn take_whole(&mut self) -> Option<Bytes> {
        match self.framing {
            Framing::Done => Some(Bytes::new()),
            Framing::Length(n) if n <= self.connection.read.len() as u64 => {
                self.framing = Framing::Done;
                Some(self.connection.read.split_to(n as usize).freeze())
            }
            _ => None,
        }
    }

    /// The connection, once the body was read to the end and the exchange leaves it
    /// fit for another.
    pub fn into_reusable(self) -> Option<Http1Connection> {
        (matches!(self.framing, Framing::Done)
            && self.keep_alive
            && self.connection.read.is_empty())
        .then(|| self.connection.reused())
    }

    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, Error>> {
        let connection = &mut self.connection;
        make_room(&mut connection.read);
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut connection.io),
            cx,
            &mut connection.read
        ))?;
        Poll::Ready(Ok(read))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            let buffered = &mut this.connection.read;
            match &mut this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(remaining) => {
                    if !buffered.is_empty() {
                        let take = (*remaining).min(buffered.len() as u64);
                        let data = buffered.split_to(take as usize).freeze();
                        *remaining -= take;
                        if *remaining == 0 {
                            this.framing = Framing::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(decoder) => match decoder.decode(buffered) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Trailers(trailers)) => {
                        this.framing = Framing::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Decoded::End) => {
                        this.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(error) => return Poll::Ready(Some(Err(error))),
                },
                Framing::UntilClose => {
                    if !buffered.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(buffered.split().freeze()))));
                    }
                }
            }
            match ready!(this.poll_more(cx)) {
                Ok(0) if matches!(this.framing, Framing::UntilClose) => {
                    this.framing = Framing::Done;
                    this.keep_alive = false;
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err(Error::Truncated))),
                Ok(_) => {}
                Err(error) => return Poll::Ready(Some(Err(error))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

// ---- Chunked transfer coding --------------------------------------------------

/// Decodes `Transfer-Encoding: chunked` (RFC 9112 §7.1) from a buffer that fills up
/// bit by bit: chunk data comes out as slices of it, extensions are dropped, trailers
/// come out as fields.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy)]
enum ChunkState {
    Size { value: u64, digits: u8 },
    Extension { value: u64, length: u16 },
    SizeLf { value: u64 },
    Data { left: u64 },
    DataCr,
    DataLf,
    Trailers,
    Done,
}

impl Default for ChunkState {
    fn default() -> Self {
        Self::Size {
            value: 0,
            digits: 0,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    NeedMore,
}

impl ChunkedDecoder {
    /// Takes what it can from the front of `buffer`.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Decoded, Error> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(Decoded::End),
                ChunkState::Data { left } => {
                    if buffer.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = left.min(buffer.len() as u64);
                    let data = buffer.split_to(take as usize).freeze();
                    self.state = if take == left {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data { left: left - take }
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::Trailers => return self.trailers(buffer),
                state => {
                    let Some(&byte) = buffer.first() else {
                        return Ok(Decoded::NeedMore);
                    };
                    buffer.advance(1);
                    self.state = next_state(state, byte)?;
                }
            }
        }
    }

    fn trailers(&mut self, buffer: &mut BytesMut) -> Result<Decoded, Error> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (length, trailers) = match httparse::parse_headers(buffer, &mut fields) {
            Ok(httparse::Status::Complete((length, fields))) => {
                let mut trailers = HeaderMap::with_capacity(fields.len());
                for field in fields {
                    let name = HeaderName::from_bytes(field.name.as_bytes())
                        .map_err(|_| Error::Malformed("invalid trailer name"))?;
                    let value = HeaderValue::from_bytes(field.value)
                        .map_err(|_| Error::Malformed("invalid trailer value"))?;
                    trailers.append(name, value);
                }
                (length, trailers)
            }
            Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD_BYTES => {
                return Ok(Decoded::NeedMore);
            }
            Ok(httparse::Status::Partial) => return Err(Error::HeadTooLarge),
            Err(_) => return Err(Error::Malformed("invalid trailer section")),
        };
        buffer.advance(length);
        self.state = ChunkState::Done;
        Ok(if trailers.is_empty() {
            Decoded::End
        } else {
            Decoded::Trailers(trailers)
        })
    }
}

/// One byte of a chunk's size line or of the line end after its data.
fn next_state(state: ChunkState, byte: u8) -> Result<ChunkState, Error> {
    use ChunkState::*;
    Ok(match (state, byte) {
        (Size { value, digits }, b) if b.is_ascii_hexdigit() => {
            // 16 hex digits fill a u64; more is no size anyone sends.
            if digits == 16 {
                return Err(Error::Malformed("chunk size too large"));
            }
            let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
            Size {
                value: value << 4 | digit,
                digits: digits + 1,
            }
        }
        (Size { value, digits }, b';' | b' ' | b'\t') if digits > 0 => {
            Extension { value, length: 0 }
        }
        (Size { value, digits }, b'\r') if digits > 0 => SizeLf { value },
        (Extension { value, .. }, b'\r') => SizeLf { value },
        (Extension { .. }, b'\n') => return Err(Error::Malformed("bare LF in a chunk extension")),
        (Extension { value, length }, _) if length < MAX_CHUNK_EXTENSION => Extension {
            value,
            length: length + 1,
        },
        (Extension { .. }, _) => return Err(Error::Malformed("chunk extension too long")),
        (SizeLf { value: 0 }, b'\n') => Trailers,
        (SizeLf { value }, b'\n') => Data { left: value },
        (DataCr, b'\r') => DataLf,
        (DataLf, b'\n') => ChunkState::default(),
        _ => return Err(Error::Malformed("invalid chunked coding")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `input` in pieces of `step` bytes; returns the data and the trailers.
    fn decode_in_steps(input: &[u8], step: usize) -> Result<(Vec<u8>, HeaderMap), Error> {
        let mut decoder = ChunkedDecoder::default();
        let mut buffer = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = HeaderMap::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buffer)? {
                Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                Decoded::Trailers(t) => trailers = t,
                Decoded::End => return Ok((data, trailers)),
                Decoded::NeedMore => {
                    if fed == input.len() {
                        return Err(Error::Truncated);
                    }
                    let end = (fed + step).min(input.len());
                    buffer.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_or_fail_as_they_should() {
        let cases: &[(&str, Option<&str>)] = &[
            ("0\r\n\r\n", Some("")),
            ("5\r\nhello\r\n0\r\n\r\n", Some("hello")),
            (
                "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
                Some("hello world"),
            ),
            ("A\r\n0123456789\r\n0\r\n\r\n", Some("0123456789")),
            ("5;name=value\r\nhello\r\n0;last\r\n\r\n", Some("hello")),
            ("5 ;ext\r\nhello\r\n0\r\n\r\n", Some("hello")),
            ("000005\r\nhello\r\n0\r\n\r\n", Some("hello")),
            ("5\r\nhello\r\n0\r\nexpires: never\r\n\r\n", Some("hello")),
            // Malformed: no size, a bad digit, data longer than its size, bare LF.
            ("\r\n", None),
            ("g\r\nhello\r\n0\r\n\r\n", None),
            ("3\r\nhello\r\n0\r\n\r\n", None),
            ("5\nhello\r\n0\r\n\r\n", None),
            ("5;a\nb\r\nhello\r\n0\r\n\r\n", None),
            ("11111111111111111\r\n", None),
        ];
        for (input, expected) in cases {
            for step in [1, 3, input.len()] {
                let decoded = decode_in_steps(input.as_bytes(), step);
                match expected {
                    Some(body) => {
                        let (data, _) = decoded.unwrap_or_else(|e| panic!("{input:?}: {e}"));
                        assert_eq!(String::from_utf8_lossy(&data), *body, "{input:?}");
                    }
                    None => assert!(decoded.is_err(), "{input:?} step {step} decoded"),
                }
            }
        }
    }

    #[test]
    fn trailers_come_out_as_fields() {
        let (data, trailers) =
            decode_in_steps(b"2\r\nok\r\n0\r\ndigest: sha-256=x\r\nsize: 2\r\n\r\n", 4)
                .expect("decoded");
        assert_eq!(data, b"ok");
        assert_eq!(trailers["digest"], "sha-256=x");
        assert_eq!(trailers["size"], "2");
    }

    #[test]
    fn bytes_after_the_last_chunk_stay_in_the_buffer() {
        let mut decoder = ChunkedDecoder::default();
        let mut buffer = BytesMut::from(&b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200"[..]);
        assert_eq!(
            decoder.decode(&mut buffer).expect("data"),
            Decoded::Data(Bytes::from_static(b"ok"))
        );
        assert_eq!(decoder.decode(&mut buffer).expect("end"), Decoded::End);
        assert_eq!(&buffer[..], b"HTTP/1.1 200");
    }

    proptest! {
        /// Any body, cut into any chunks with or without extensions, and fed to the
        /// decoder in any pieces, comes out whole.
        #[test]
        fn any_chunking_decodes_to_the_body(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            extensions in any::<bool>(),
            step in 1usize..64,
        ) {
            let mut encoded = Vec::new();
            for chunk in &chunks {
                encoded.extend_from_slice(format!("{:X}", chunk.len()).as_bytes());
                if extensions {
                    encoded.extend_from_slice(b";x=\"y\"");
                }
                encoded.extend_from_slice(b"\r\n");
                encoded.extend_from_slice(chunk);
                encoded.extend_from_slice(b"\r\n");
            }
            encoded.extend_from_slice(b"0\r\n\r\n");
            let (data, trailers) = decode_in_steps(&encoded, step).expect("decoded");
            prop_assert_eq!(data, chunks.concat());
            prop_assert!(trailers.is_empty());
        }
    }

    fn head(text: &str) -> response::Parts {
        let mut buffer = BytesMut::from(text.as_bytes());
        parse_response_head(&mut buffer, &mut Vec::new())
            .expect("valid head")
            .expect("whole head")
    }

    #[test]
    fn a_response_head_is_parsed_and_taken_out_of_the_buffer() {
        let mut buffer = BytesMut::from(
            &b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-A: 1\r\nx-a: 2\r\n\r\nok"[..],
        );
        let parts = parse_response_head(&mut buffer, &mut Vec::new())
            .expect("valid")
            .expect("whole");
        assert_eq!(parts.status, StatusCode::CREATED);
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers[CONTENT_LENGTH], "2");
        let repeated: Vec<_> = parts.headers.get_all("x-a").iter().collect();
        assert_eq!(repeated, ["1", "2"]);
        assert_eq!(&buffer[..], b"ok");

        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(
            parse_response_head(&mut partial, &mut Vec::new())
                .expect("valid so far")
                .is_none()
        );
        let mut garbage = BytesMut::from(&b"SSH-2.0-OpenSSH\r\n\r\n"[..]);
        assert!(parse_response_head(&mut garbage, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_head_of_many_fields_parses_and_names_are_remembered() {
        let mut text = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..60 {
            text.push_str(&format!("x-field-{i}: {i}\r\n"));
        }
        text.push_str("\r\n");
        let mut names = Vec::new();
        let parts = parse_response_head(&mut BytesMut::from(text.as_bytes()), &mut names)
            .expect("valid")
            .expect("whole");
        assert_eq!(parts.headers.len(), 60);
        assert_eq!(parts.headers["x-field-59"], "59");
        assert_eq!(names.len(), MAX_REMEMBERED_NAMES);

        let again = "HTTP/1.1 200 OK\r\nX-Field-3: again\r\n\r\n";
        let parts = parse_response_head(&mut BytesMut::from(again.as_bytes()), &mut names)
            .expect("valid")
            .expect("whole");
        assert_eq!(parts.headers["x-field-3"], "again");
        assert_eq!(names.len(), MAX_REMEMBERED_NAMES);

        let mut too_many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            too_many.push_str(&format!("x-{i}: {i}\r\n"));
        }
        too_many.push_str("\r\n");
        assert!(parse_response_head(&mut BytesMut::from(too_many.as_bytes()), &mut names).is_err());
    }

    #[test]
    fn names_are_remembered_as_spelled() {
        let mut names = RememberedNames::new();
        for head in [
            "HTTP/1.1 200 OK\r\nContent-Type: a\r\nX-Trace: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-type: b\r\nX-Trace: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Type: c\r\nX-Trace: 3\r\n\r\n",
        ] {
            let parts = parse_response_head(&mut BytesMut::from(head.as_bytes()), &mut names)
                .expect("valid")
                .expect("whole");
            assert_eq!(parts.headers.len(), 2, "{head}");
            assert!(parts.headers.contains_key("content-type"), "{head}");
            assert!(parts.headers.contains_key("x-trace"), "{head}");
        }
        let spelled: Vec<&[u8]> = names.iter().map(|(s, _)| &**s).collect();
        assert_eq!(
            spelled,
            [&b"Content-Type"[..], b"X-Trace", b"content-type"],
            "one entry per spelling, found again byte for byte"
        );
        assert_eq!(names[0].1, names[2].1, "both spellings name one field");
    }

    #[test]
    fn small_responses_share_a_read_buffer_until_little_room_is_left() {
        const RESPONSES: usize = 100;
        const SIZE: usize = 200;
        let mut buffer = BytesMut::new();
        let mut kept = Vec::new();
        let mut allocations = 0;
        for _ in 0..RESPONSES {
            let before = buffer.capacity() - buffer.len();
            make_room(&mut buffer);
            if buffer.capacity() - buffer.len() != before {
                allocations += 1;
            }
            assert!(buffer.capacity() - buffer.len() >= MIN_READ_ROOM);
            buffer.extend_from_slice(&[b'x'; SIZE]);
            // A head taken out shares the buffer's allocation while it lives.
            kept.push(buffer.split_to(SIZE).freeze());
        }
        let most = RESPONSES * SIZE / (READ_CHUNK - MIN_READ_ROOM) + 2;
        assert!(
            allocations <= most,
            "{allocations} allocations for {RESPONSES} responses (at most {most})"
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        use Framing::*;
        let get = Method::GET;
        let cases: &[(&Method, &str, &str)] = &[
            (
                &get,
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                "Length(5)",
            ),
            (&get, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "Done"),
            (
                &get,
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
                "Length(5)",
            ),
            (
                &get,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Chunked",
            ),
            (
                &get,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nContent-Length: 9\r\n\r\n",
                "Chunked",
            ),
            // Codings other than chunked are refused, not passed on decoded of their
            // chunks only; chunked twice is malformed.
            (
                &get,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n",
                "error",
            ),
            (
                &get,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                "error",
            ),
            (
                &get,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "error",
            ),
            (
                &get,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
                "UntilClose",
            ),
            (&get, "HTTP/1.1 200 OK\r\n\r\n", "UntilClose"),
            (
                &get,
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                "Done",
            ),
            (
                &get,
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                "Done",
            ),
            (
                &Method::HEAD,
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                "Done",
            ),
            (
                &get,
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                "error",
            ),
            (
                &get,
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "error",
            ),
        ];
        for (method, text, expected) in cases {
            let head = head(text);
            let framing = response_framing(method, &head, FramingFields::of(&head.headers));
            let got = match framing {
                Ok(Length(n)) => format!("Length({n})"),
                Ok(Chunked(_)) => "Chunked".to_owned(),
                Ok(UntilClose) => "UntilClose".to_owned(),
                Ok(Done) => "Done".to_owned(),
                Err(_) => "error".to_owned(),
            };
            assert_eq!(&got, expected, "{method} {text:?}");
        }
    }

    /// The one pass finds what a lookup of each field would, whatever the spelling,
    /// the order, repeats or the fields around them.
    #[test]
    fn framing_fields_are_those_a_lookup_finds() {
        let heads = [
            "HTTP/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\nTRANSFER-ENCODING: chunked\r\nDate: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\nContent-Length: 9\r\nconnection: close\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\nX-Content-Length: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\n\r\n",
        ];
        for text in heads {
            let head = head(text);
            let looked_up = FramingFields {
                transfer_encoding: head.headers.contains_key(TRANSFER_ENCODING),
                content_length: head.headers.contains_key(CONTENT_LENGTH),
                connection: head.headers.contains_key(CONNECTION),
            };
            assert_eq!(FramingFields::of(&head.headers), looked_up, "{text:?}");
        }
        let both = head(heads[3]);
        let fields = FramingFields::of(&both.headers);
        assert!(fields.transfer_encoding && fields.content_length && fields.connection);
    }

    // ---- Conversations with a scripted replica on loopback ----

    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use tokio::{io::AsyncReadExt, net::TcpListener};

    /// The replica's time to begin an answer, where the test is not about it.
    const ANSWER_DUE: std::time::Duration = std::time::Duration::from_secs(5);

    /// When the scripted replica answers: once it has a request's head, or its whole
    /// chunked body too.
    #[derive(Clone, Copy)]
    enum After {
        Head,
        Body,
    }

    /// Where the request at the start of `bytes` ends, once it is all there.
    fn request_end(bytes: &[u8], after: After) -> Option<usize> {
        let text = String::from_utf8_lossy(bytes);
        let head_end = text.find("\r\n\r\n")? + 4;
        match after {
            After::Head => Some(head_end),
            After::Body => {
                let rest = &text[head_end..];
                let last = if rest.starts_with("0\r\n") {
                    0
                } else {
                    rest.find("\r\n0\r\n")? + 2
                };
                Some(head_end + last + rest[last..].find("\r\n\r\n")? + 4)
            }
        }
    }

    /// A replica for one connection: each reply goes out once its request has arrived;
    /// after the last it reads until the connection closes and returns all it read. With
    /// no replies it closes at once.
    async fn replica(
        replies: Vec<(After, &'static [u8])>,
    ) -> (Http1Connection, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let (mut seen, mut answered) = (Vec::new(), 0);
            let mut buffer = [0u8; 4096];
            for (after, reply) in replies {
                while request_end(&seen[answered..], after).is_none() {
                    let n = stream.read(&mut buffer).await.expect("read");
                    if n == 0 {
                        return String::from_utf8_lossy(&seen).into_owned();
                    }
                    seen.extend_from_slice(&buffer[..n]);
                }
                answered += request_end(&seen[answered..], after).unwrap_or(0);
                stream.write_all(reply).await.expect("write");
            }
            if answered > 0 {
                while let Ok(n) = stream.read(&mut buffer).await
                    && n > 0
                {
                    seen.extend_from_slice(&buffer[..n]);
                }
            }
            String::from_utf8_lossy(&seen).into_owned()
        });
        (connect(addr).await, served)
    }

    async fn read_body(mut body: ResponseBody) -> (Vec<u8>, HeaderMap, Option<Http1Connection>) {
        let (mut data, mut trailers) = (Vec::new(), HeaderMap::new());
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("frame");
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().expect("trailers"),
            }
        }
        (data, trailers, body.into_reusable())
    }

    async fn connect(addr: std::net::SocketAddr) -> Http1Connection {
        over(TcpStream::connect(addr).await.expect("connect"))
    }

    fn over(io: TcpStream) -> Http1Connection {
        let permit = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit");
        Http1Connection::new(io, permit, Gauge::default())
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        Request::get(path)
            .header("host", "fn.example")
            .body(Empty::new())
            .expect("request")
    }

    fn response(answer: Answer) -> (response::Parts, ResponseBody) {
        match answer {
            Answer::Response(parts, body) => (parts, body),
            Answer::Switched(..) => panic!("switched protocols"),
        }
    }

    #[tokio::test]
    async fn a_chunked_response_with_trailers_is_read_and_the_connection_kept() {
        let (connection, served) = replica(vec![
            (
                After::Head,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\ndigest: d\r\n\r\n",
            ),
            (After::Head, b"HTTP/1.1 204 No Content\r\n\r\n"),
        ])
        .await;
        let (_, body) = response(
            connection
                .send(get("/a"), ANSWER_DUE, ANSWER_DUE)
                .await
                .expect("answer"),
        );
        let (data, trailers, reusable) = read_body(body).await;
        assert_eq!(data, b"hello world");
        assert_eq!(trailers["digest"], "d");
        let connection = reusable.expect("kept for reuse").reused();
        let (parts, mut body) = response(
            connection
                .send(get("/b"), ANSWER_DUE, ANSWER_DUE)
                .await
                .expect("second answer"),
        );
        assert_eq!(parts.status, StatusCode::NO_CONTENT);
        assert_eq!(body.take_whole().expect("no body"), Bytes::new());
        drop(body);
        let seen = served.await.expect("replica");
        assert_eq!(
            seen,
            "GET /a HTTP/1.1\r\nhost: fn.example\r\n\r\nGET /b HTTP/1.1\r\nhost: fn.example\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn both_framings_at_once_are_read_chunked_and_the_connection_not_reused() {
        let (connection, served) = replica(vec![(
            After::Head,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        )])
        .await;
        let (parts, body) = response(
            connection
                .send(get("/"), ANSWER_DUE, ANSWER_DUE)
                .await
                .expect("answer"),
        );
        assert!(
            !parts.headers.contains_key(CONTENT_LENGTH),
            "the replica's length is not the body's"
        );
        let (data, _, reusable) = read_body(body).await;
        assert_eq!(data, b"ok");
        assert!(reusable.is_none());
        drop(served);
    }

    #[tokio::test]
    async fn a_connection_the_replica_closes_is_not_reused() {
        let (connection, served) = replica(vec![(
            After::Head,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, Close\r\n\r\nok",
        )])
        .await;
        let (_, mut body) = response(
            connection
                .send(get("/"), ANSWER_DUE, ANSWER_DUE)
                .await
                .expect("answer"),
        );
        assert_eq!(body.take_whole().expect("whole"), Bytes::from_static(b"ok"));
        assert!(body.into_reusable().is_none());
        drop(served);
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_head_has_no_body() {
        let (connection, served) = replica(vec![
            (
                After::Head,
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            ),
            (After::Head, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        ])
        .await;
        let (parts, mut body) = response(
            connection
                .send(get("/"), ANSWER_DUE, ANSWER_DUE)
                .await
                .expect("answer"),
        );
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body.take_whole().expect("whole"), Bytes::from_static(b"ok"));
        let connection = body.into_reusable().expect("kept").reused();
        let head = Request::head("/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let (parts, mut body) = response(
            connection
                .send(head, ANSWER_DUE, ANSWER_DUE)
                .await
                .expect("answer"),
        );
        assert_eq!(parts.headers[CONTENT_LENGTH], "5");
        assert_eq!(body.take_whole().expect("none"), Bytes::new());
        assert!(body.into_reusable().is_some(), "nothing was left to read");
        drop(served);
    }

    #[tokio::test]
    async fn a_body_without_framing_runs_until_close_and_the_connection_goes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\nall ").await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let _ = stream.write_all(b"of it").await;
            // Dropped: the close ends the body.
        });
        let connection = connect(addr).await;
        let (_, body) = response(
            connection
                .send(get("/"), ANSWER_DUE, ANSWER_DUE)
                .await
                .expect("answer"),
        );
        let (data, _, reusable) = read_body(body).await;
        assert_eq!(data, b"all of it");
        assert!(reusable.is_none());
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_chunked_with_its_trailers() {
        let (connection, served) = replica(vec![(
            After::Body,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        )])
        .await;
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"0123456789abcdef"))),
            Ok(Frame::trailers(HeaderMap::from_iter([(
                HeaderName::from_static("digest"),
                HeaderValue::from_static("x"),
            )]))),
        ];
        let body = StreamBody::new(futures::stream::iter(frames));
        let request = Request::post("/up").body(body).expect("request");
        let (parts, body) = response(
            connection
                .send(request, ANSWER_DUE, ANSWER_DUE)
                .await
                .expect("answer"),
        );
        assert_eq!(parts.status, StatusCode::OK);
        assert!(body.into_reusable().is_some(), "the whole body went out");
        let seen = served.await.expect("replica");
        assert_eq!(
            seen,
            "POST /up HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\ndigest: x\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_body_stops_the_upload() {
        let (connection, served) = replica(vec![(
            After::Head,
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n",
        )])
        .await;
        // A body that never ends: only the replica's early answer can end the send.
        let body = StreamBody::new(futures::stream::pending::<
            Result<Frame<Bytes>, std::convert::Infallible>,
        >());
        let request = Request::post("/up").body(body).expect("request");
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            connection.send(request, ANSWER_DUE, ANSWER_DUE),
        )
        .await
        .expect("the early answer ends the send");
        let (parts, mut body) = response(answer.expect("answer"));
        assert_eq!(parts.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            body.take_whole().expect("whole"),
            Bytes::from_static(b"too big\n")
        );
        assert!(body.into_reusable().is_none(), "the request was cut short");
        drop(served);
    }

    /// Why `send` gave up (within 10 s), once the replica has the request or part of
    /// it: never given back to be sent again.
    async fn given_up<B: std::fmt::Debug>(
        send: impl std::future::Future<Output = Result<Answer, SendError<B>>>,
    ) -> Error {
        let failed = tokio::time::timeout(std::time::Duration::from_secs(10), send)
            .await
            .expect("given up, not held")
            .expect_err("no answer");
        assert!(
            failed.unsent.is_none(),
            "the replica has the request, or part of it: never sent again"
        );
        failed.error
    }

    #[tokio::test]
    async fn a_client_that_stops_sending_the_body_is_given_up() {
        // The replica reads all it is sent and waits for the rest.
        let (addr, served) = replica_answering_early(b"", read_on).await;
        let connection = connect(addr).await;
        let request = paused_upload();
        let pause = std::time::Duration::from_millis(300);
        let error = given_up(connection.send(request, ANSWER_DUE, pause)).await;
        assert!(
            matches!(error, Error::ClientBodyStalled(limit) if limit == pause),
            "{error:?}"
        );
        served.abort();
    }

    /// One part of a 1 MB upload, then nothing, the connection kept open.
    fn paused_upload()
    -> Request<impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin + std::fmt::Debug>
    {
        let first = futures::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(
            Bytes::from_static(b"first part"),
        ))]);
        let frames = futures::StreamExt::chain(first, futures::stream::pending());
        Request::post("/up")
            .header(CONTENT_LENGTH, 1_000_000)
            .body(StreamBody::new(frames))
            .expect("request")
    }

    /// A replica that reads a request's head, sends `early` and reads on; an upload of
    /// one part, then a client that sends nothing more (its connection kept open).
    async fn upload_paused_after(
        early: &'static [u8],
        pause: std::time::Duration,
    ) -> Result<Answer, SendError<impl Body + std::fmt::Debug>> {
        let (addr, served) = replica_answering_early(early, read_on).await;
        let request = paused_upload();
        let sent = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            connect(addr).await.send(request, ANSWER_DUE, pause),
        )
        .await
        .expect("answered or given up within 10 s");
        served.abort();
        sent
    }

    #[tokio::test]
    async fn a_whole_early_answer_comes_through_when_the_client_pauses() {
        // The replica answered at once (a handler that ignores the body): the client
        // that stops sending gets that answer, not a 408.
        let sent = upload_paused_after(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
            std::time::Duration::from_millis(300),
        )
        .await;
        let (parts, mut body) = response(sent.expect("the replica's answer"));
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body.take_whole(), Some(Bytes::from_static(b"first")));
        assert!(body.into_reusable().is_none(), "the upload was cut short");
    }

    #[tokio::test]
    async fn an_early_answer_still_coming_when_the_client_pauses_is_given_up() {
        // Part of the answer's body: the replica may be streaming an answer to the
        // whole upload, which the client's pause cut; the pause stands.
        let pause = std::time::Duration::from_millis(300);
        let sent = upload_paused_after(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
            pause,
        )
        .await;
        let failed = sent.expect_err("no whole answer");
        assert!(
            matches!(failed.error, Error::ClientBodyStalled(limit) if limit == pause),
            "{:?}",
            failed.error
        );
    }

    #[tokio::test]
    async fn an_early_answer_comes_through_while_a_write_waits() {
        // 413, then nothing more read, the connection kept open.
        let (connection, request, served) = early_answer_to_an_upload(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n",
            |stream| {
                Box::pin(async move {
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    drop(stream);
                })
            },
        )
        .await;
        // Far sooner than the replica's time to take a write.
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            connection.send(request, std::time::Duration::from_secs(60), ANSWER_DUE),
        )
        .await
        .expect("the early answer, not the write's limit");
        let (parts, mut body) = response(answer.expect("answer"));
        assert_eq!(parts.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            body.take_whole().expect("whole"),
            Bytes::from_static(b"too big\n")
        );
        assert!(body.into_reusable().is_none(), "the request was cut short");
        served.abort();
    }

    /// A replica that reads a request's head, sends `early`, then does `after` with
    /// the connection; and an upload to it, far larger than the sockets' buffers.
    async fn early_answer_to_an_upload(
        early: &'static [u8],
        after: impl FnOnce(TcpStream) -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    ) -> (
        Http1Connection,
        Request<
            impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin + std::fmt::Debug,
        >,
        tokio::task::JoinHandle<()>,
    ) {
        let (addr, served) = replica_answering_early(early, after).await;
        let frames = futures::stream::iter((0..UPLOAD_PARTS).map(|_| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![7u8; 65536])))
        }));
        let request = Request::post("/up")
            .header(CONTENT_LENGTH, UPLOAD_PARTS * 65536)
            .body(StreamBody::new(frames))
            .expect("request");
        (connect(addr).await, request, served)
    }

    /// A replica that reads a request's head, a byte at a time (none of the body is
    /// read with it), sends `early`, then does `after` with the connection.
    async fn replica_answering_early(
        early: &'static [u8],
        after: impl FnOnce(TcpStream) -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            while !seen.ends_with(b"\r\n\r\n") {
                seen.push(stream.read_u8().await.expect("read"));
            }
            stream.write_all(early).await.expect("answered");
            after(stream).await;
        });
        (addr, served)
    }

    const UPLOAD_PARTS: usize = 1024;

    #[tokio::test]
    async fn an_early_answer_that_accepts_the_upload_lets_all_of_it_through() {
        // 200 at once, then the body read to its end (slowly: the writes wait), then
        // the response's body: how much arrived.
        let (connection, request, served) = early_answer_to_an_upload(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            |mut stream| {
                Box::pin(async move {
                    let mut received = 0;
                    let mut buffer = vec![0u8; 65536];
                    while received < UPLOAD_PARTS * 65536 {
                        let n = stream.read(&mut buffer).await.expect("read");
                        assert!(n > 0, "the upload was cut at {received} bytes");
                        received += n;
                        if received % (1 << 20) < n {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                    }
                    stream.write_all(b"all of it").await.expect("answered");
                })
            },
        )
        .await;
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            connection.send(request, ANSWER_DUE, ANSWER_DUE),
        )
        .await
        .expect("answered");
        let (parts, body) = response(answer.expect("answer"));
        assert_eq!(parts.status, StatusCode::OK);
        let (data, _, _) =
            tokio::time::timeout(std::time::Duration::from_secs(10), read_body(body))
                .await
                .expect("the replica's answer, once it had the whole upload");
        assert_eq!(data, b"all of it");
        served.await.expect("the whole upload arrived");
    }

    #[tokio::test]
    async fn an_early_refusal_from_a_replica_that_closes_is_forwarded() {
        // 413, then the connection closed with the upload unread (a reset).
        let (connection, request, served) = early_answer_to_an_upload(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n",
            |stream| Box::pin(async move { drop(stream) }),
        )
        .await;
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            connection.send(request, ANSWER_DUE, ANSWER_DUE),
        )
        .await
        .expect("answered");
        let (parts, _) = response(answer.expect("the replica's answer, not a failed write"));
        assert_eq!(parts.status, StatusCode::PAYLOAD_TOO_LARGE);
        served.await.expect("replica");
    }

    /// What `send` passes on from a replica that sends `early` to an upload, then does
    /// `after`, a write being given up after `stall`: the status and the whole body of
    /// its answer (the connection not kept: the upload was cut short).
    async fn early_answer_passed_on(
        early: &'static [u8],
        after: impl FnOnce(TcpStream) -> futures::future::BoxFuture<'static, ()> + Send + 'static,
        stall: std::time::Duration,
    ) -> (StatusCode, Bytes) {
        let (connection, request, served) = early_answer_to_an_upload(early, after).await;
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            connection.send(request, stall, ANSWER_DUE),
        )
        .await
        .expect("answered within 10 s");
        let (parts, mut body) = response(answer.expect("the replica's answer, not a 504 or 502"));
        let whole = body.take_whole().expect("whole");
        assert!(body.into_reusable().is_none(), "the upload was cut short");
        served.abort();
        (parts.status, whole)
    }

    /// Everything sent read, until the connection ends.
    fn read_on(mut stream: TcpStream) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut buffer = [0u8; 4096];
            while stream.read(&mut buffer).await.is_ok_and(|n| n > 0) {}
        })
    }

    /// Nothing more read for 30 s, the connection kept open.
    fn stop_reading(stream: TcpStream) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            drop(stream);
        })
    }

    #[tokio::test]
    async fn an_early_2xx_then_no_more_reading_comes_through_once_the_write_stalls() {
        // A whole `200` at once, then nothing more read: the replica has answered and
        // wants no more of the body.
        let passed_on = early_answer_passed_on(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
            stop_reading,
            std::time::Duration::from_millis(300),
        )
        .await;
        assert_eq!(passed_on, (StatusCode::OK, Bytes::from_static(b"first")));
    }

    #[tokio::test]
    async fn an_early_2xx_then_a_close_comes_through() {
        // A whole `200` at once, then the connection closed with the body unread (a
        // reset, for the data it never read): the answer, not a failed write.
        let passed_on = early_answer_passed_on(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
            |stream| Box::pin(async move { drop(stream) }),
            ANSWER_DUE,
        )
        .await;
        assert_eq!(passed_on, (StatusCode::OK, Bytes::from_static(b"first")));
    }

    #[tokio::test]
    async fn an_early_2xx_whose_body_came_after_its_head_comes_through() {
        // The head, then (once the head has been seen, and nothing more is read) the
        // body, then nothing more read: what came after the head is read when the
        // write stalls, and the whole answer goes through.
        let passed_on = early_answer_passed_on(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            |mut stream| {
                Box::pin(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    stream.write_all(b"first").await.expect("answered");
                    stop_reading(stream).await;
                })
            },
            std::time::Duration::from_millis(300),
        )
        .await;
        assert_eq!(passed_on, (StatusCode::OK, Bytes::from_static(b"first")));
    }

    #[tokio::test]
    async fn an_early_2xx_still_coming_when_the_write_stalls_is_given_up() {
        // The head and part of a body, then nothing more read or sent: the rest of the
        // answer may never come, so the stall stands.
        let (connection, request, served) = early_answer_to_an_upload(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
            stop_reading,
        )
        .await;
        let stall = std::time::Duration::from_millis(300);
        let error = given_up(connection.send(request, stall, ANSWER_DUE)).await;
        assert!(
            matches!(error, Error::BodyNotTaken(limit) if limit == stall),
            "{error:?}"
        );
        served.abort();
    }

    #[tokio::test]
    async fn an_early_2xx_framed_by_the_close_then_a_reset_is_a_failure() {
        // A body that ends with the connection: after a reset, what came cannot be
        // told from the whole of it, so it is not passed on as whole.
        let (connection, request, served) =
            early_answer_to_an_upload(b"HTTP/1.1 200 OK\r\n\r\npartial", |stream| {
                Box::pin(async move { drop(stream) })
            })
            .await;
        let error = given_up(connection.send(request, ANSWER_DUE, ANSWER_DUE)).await;
        assert!(matches!(error, Error::Io(_)), "{error:?}");
        served.await.expect("replica");
    }

    #[tokio::test]
    async fn a_replica_that_stops_reading_the_body_is_given_up() {
        // It reads the head, then nothing more, and keeps the connection open.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buffer = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
                let n = stream.read(&mut buffer).await.expect("read");
                seen.extend_from_slice(&buffer[..n]);
            }
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            drop(stream);
        });
        let connection = connect(addr).await;
        // More than any socket buffers hold, in frames of 64 KiB.
        let frames = futures::stream::iter((0..4096).map(|_| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![7u8; 65536])))
        }));
        let request = Request::post("/up")
            .header(CONTENT_LENGTH, 4096 * 65536)
            .body(StreamBody::new(frames))
            .expect("request");
        let stall = std::time::Duration::from_millis(300);
        let error = given_up(connection.send(request, stall, ANSWER_DUE)).await;
        assert!(
            matches!(error, Error::BodyNotTaken(limit) if limit == stall),
            "{error:?}"
        );
        served.abort();
    }

    #[tokio::test]
    async fn an_interim_answer_during_the_upload_lets_the_body_go_on() {
        // `100 Continue` as soon as the head is in, then the final answer once the
        // whole body is: the upload must not stop at the interim answer.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buffer = [0u8; 4096];
            for (until, reply) in [
                ("\r\n\r\n", &b"HTTP/1.1 100 Continue\r\n\r\n"[..]),
                (
                    "\r\n0\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nuploaded",
                ),
            ] {
                while !String::from_utf8_lossy(&seen).ends_with(until) {
                    let n = stream.read(&mut buffer).await.expect("read");
                    assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
                    seen.extend_from_slice(&buffer[..n]);
                }
                stream.write_all(reply).await.expect("write");
            }
            String::from_utf8_lossy(&seen).into_owned()
        });
        let connection = connect(addr).await;
        // The body comes later than the interim answer, as it does from a client that
        // waited for its own `100 Continue`.
        let (send_frame, frames) = futures::channel::mpsc::unbounded();
        tokio::spawn(async move {
            for _ in 0..2 {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                let frame = Frame::data(Bytes::from_static(b"part"));
                let _ = send_frame.unbounded_send(Ok::<_, std::convert::Infallible>(frame));
            }
        });
        let body = StreamBody::new(frames);
        let request = Request::post("/up")
            .header("expect", "100-continue")
            .body(body)
            .expect("request");
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            connection.send(request, ANSWER_DUE, ANSWER_DUE),
        )
        .await
        .expect("answered once the whole body is sent");
        let (parts, body) = response(answer.expect("answer"));
        assert_eq!(parts.status, StatusCode::OK);
        let (data, _, reusable) = read_body(body).await;
        assert_eq!(data, b"uploaded");
        assert!(reusable.is_some(), "the whole exchange happened");
        drop(reusable);
        assert_eq!(
            served.await.expect("replica"),
            "POST /up HTTP/1.1\r\nexpect: 100-continue\r\ntransfer-encoding: chunked\r\n\r\n4\r\npart\r\n4\r\npart\r\n0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_replica_that_does_not_begin_its_answer_in_time_is_given_up() {
        // The replica reads the request and never answers.
        let (connection, served) = replica(vec![(After::Head, b"")]).await;
        let due = Duration::from_millis(200);
        let error = given_up(connection.send(get("/"), due, ANSWER_DUE)).await;
        assert!(
            matches!(error, Error::NoAnswerInTime(t) if t == due),
            "{error:?}"
        );
        let seen = served.await.expect("replica");
        assert!(seen.starts_with("GET / HTTP/1.1"), "{seen}");
    }

    #[tokio::test]
    async fn the_time_to_answer_runs_from_the_end_of_the_body() {
        // The body takes longer to arrive than the replica has to answer; the replica
        // answers as soon as the whole body is in.
        let (connection, served) = replica(vec![(
            After::Body,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )])
        .await;
        let (send_frame, frames) = futures::channel::mpsc::unbounded();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                let frame = Frame::data(Bytes::from_static(b"part"));
                let _ = send_frame.unbounded_send(Ok::<_, std::convert::Infallible>(frame));
            }
        });
        let request = Request::post("/up")
            .body(StreamBody::new(frames))
            .expect("request");
        let answer = connection
            .send(request, Duration::from_millis(500), ANSWER_DUE)
            .await
            .expect("answered once the body was in");
        let (parts, mut body) = response(answer);
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body.take_whole(), Some(Bytes::from_static(b"ok")));
        drop(body);
        let seen = served.await.expect("replica");
        assert!(seen.ends_with("4\r\npart\r\n0\r\n\r\n"), "{seen}");
    }

    #[tokio::test]
    async fn each_answer_on_a_kept_connection_has_its_own_deadline() {
        // The replica answers the first request at once, the second after 300 ms and
        // the third after 100 ms.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let (mut seen, mut buffer) = (String::new(), [0u8; 4096]);
            for pause in [0, 300, 100] {
                while !seen.contains("\r\n\r\n") {
                    let n = stream.read(&mut buffer).await.expect("read");
                    assert!(n > 0, "closed early");
                    seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
                }
                seen.clear();
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                stream.write_all(reply).await.expect("write");
            }
        });
        let due = Duration::from_millis(400);
        let (_, mut body) = response(
            connect(addr)
                .await
                .send(get("/first"), due, ANSWER_DUE)
                .await
                .expect("first answer"),
        );
        assert!(body.take_whole().is_some());
        let connection = body.into_reusable().expect("kept");
        // Sent 200 ms after the first, the second is answered after the first's
        // deadline has passed and before its own.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = connection.send(get("/second"), due, ANSWER_DUE).await;
        let (parts, mut body) = response(answer.expect("second answer, within its own time"));
        assert_eq!(parts.status, StatusCode::OK);
        assert!(body.take_whole().is_some());
        // Idle until the second's deadline has fired: the third's time starts afresh.
        let connection = body.into_reusable().expect("kept");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let answer = connection.send(get("/third"), due, ANSWER_DUE).await;
        let (parts, _) = response(answer.expect("third answer, within its own time"));
        assert_eq!(parts.status, StatusCode::OK);
    }

    #[test]
    fn interim_answers_are_taken_off_and_a_final_one_stays() {
        for (sent, early, left) in [
            ("HTTP/1.1 100 Continue\r\n\r\n", Early::Interim, ""),
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                Early::Interim,
                "",
            ),
            ("HTTP/1.1 100 Cont", Early::Interim, "HTTP/1.1 100 Cont"),
            ("HTTP/1.", Early::Interim, "HTTP/1."),
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Too Large\r\n",
                Early::Final,
                "HTTP/1.1 413 Too Large\r\n",
            ),
            (
                "HTTP/1.1 200 OK\r\n",
                Early::Answering,
                "HTTP/1.1 200 OK\r\n",
            ),
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
                Early::Answering,
                "HTTP/1.1 200 OK\r\n\r\n",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                Early::Final,
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            ),
            ("garbage\r\n\r\n", Early::Final, "garbage\r\n\r\n"),
        ] {
            let mut read = BytesMut::from(sent);
            assert_eq!(only_interim_answers(&mut read), early, "{sent:?}");
            assert_eq!(&read[..], left.as_bytes(), "{sent:?}");
        }
        // Early hints with as many fields as a response may have: still interim.
        let mut hints = "HTTP/1.1 103 Early Hints\r\n".to_owned();
        for i in 0..MAX_HEADERS {
            hints.push_str(&format!("Link: </{i}>\r\n"));
        }
        hints.push_str("\r\n");
        let mut read = BytesMut::from(hints.as_str());
        assert_eq!(only_interim_answers(&mut read), Early::Interim);
        assert!(read.is_empty());
        // What never becomes a head (an endless field, endless empty lines) stops the
        // upload once it is as large as a head may be, rather than growing the buffer
        // without end.
        let endless_field = format!("HTTP/1.1 100 Continue\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        for endless in [endless_field, "\r\n".repeat(MAX_HEAD_BYTES / 2)] {
            let mut read = BytesMut::from(&endless.as_bytes()[..100]);
            assert_eq!(only_interim_answers(&mut read), Early::Interim);
            let mut read = BytesMut::from(endless.as_str());
            assert_eq!(only_interim_answers(&mut read), Early::Final);
        }
    }

    /// `request` sent over a reused connection the replica has closed: given back.
    async fn given_back(request: Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
        let (connection, served) = replica(vec![]).await;
        let _ = served.await;
        let failed = connection
            .reused()
            .send(request, ANSWER_DUE, ANSWER_DUE)
            .await
            .expect_err("closed");
        failed.unsent.expect("given back")
    }

    /// Sends a given-back request to a replica and returns what the replica read.
    async fn sent_again(unsent: Request<Empty<Bytes>>) -> String {
        let (connection, served) =
            replica(vec![(After::Head, b"HTTP/1.1 204 No Content\r\n\r\n")]).await;
        let (parts, body) = response(
            connection
                .send(unsent, ANSWER_DUE, ANSWER_DUE)
                .await
                .expect("answer"),
        );
        assert_eq!(parts.status, StatusCode::NO_CONTENT);
        drop(body);
        served.await.expect("replica")
    }

    #[tokio::test]
    async fn a_request_given_back_twice_still_goes_out_as_first_written() {
        let unsent = given_back(get("/again")).await;
        // The next connection is reset before anything is written to it.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let io = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        accepted.set_zero_linger().expect("linger");
        drop(accepted);
        io.readable().await.expect("the reset arrives");
        let failed = over(io)
            .send(unsent, ANSWER_DUE, ANSWER_DUE)
            .await
            .expect_err("reset");
        assert!(matches!(failed.error, Error::Io(_)), "{:?}", failed.error);
        let unsent = failed.unsent.expect("given back again");
        assert_eq!(
            sent_again(unsent).await,
            "GET /again HTTP/1.1\r\nhost: fn.example\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_reused_connection_closed_before_answering_gives_an_idempotent_request_back() {
        let unsent = given_back(get("/again")).await;
        assert!(
            unsent.headers().is_empty(),
            "once written, its fields (slices of the client's read buffer) are gone"
        );
        // Sent again, it goes out as it was first written.
        assert_eq!(
            sent_again(unsent).await,
            "GET /again HTTP/1.1\r\nhost: fn.example\r\n\r\n"
        );

        let (connection, served) = replica(vec![]).await;
        let _ = served.await;
        let post = Request::post("/once")
            .body(Full::new(Bytes::from_static(b"x")))
            .expect("request");
        let failed = connection
            .reused()
            .send(post, ANSWER_DUE, ANSWER_DUE)
            .await
            .expect_err("closed");
        assert!(
            failed.unsent.is_none(),
            "a request with a body may have been read"
        );

        let (connection, served) = replica(vec![]).await;
        let _ = served.await;
        let failed = connection
            .send(get("/fresh"), ANSWER_DUE, ANSWER_DUE)
            .await
            .expect_err("closed");
        assert!(
            failed.unsent.is_none(),
            "a new connection closed without an answer is the replica's failure"
        );
    }

    #[test]
    fn a_request_head_carries_its_framing() {
        let request = Request::post("/upload?x=1")
            .header("host", "fn.example")
            .body(())
            .expect("request");
        // The buffer is the connection's: what an earlier request left in it goes.
        let mut head = b"GET /earlier HTTP/1.1\r\n\r\n".to_vec();
        encode_request_head(&mut head, &request, true);
        assert_eq!(
            String::from_utf8(head).expect("utf-8"),
            "POST /upload?x=1 HTTP/1.1\r\nhost: fn.example\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let trailers = encode_trailers(&HeaderMap::from_iter([(
            HeaderName::from_static("digest"),
            HeaderValue::from_static("x"),
        )]));
        assert_eq!(trailers, b"0\r\ndigest: x\r\n\r\n");
    }
}
