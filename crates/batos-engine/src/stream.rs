//! The per-request event channel: the step loop pushes, a [`TokenStream`] pops, as a
//! blocking iterator or an async stream (no runtime needed: it stores the waker).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use batos_types::RequestId;

use crate::engine::Command;
use crate::request::{Completion, StopReason, StreamEvent};

#[derive(Default)]
struct State {
    events: VecDeque<StreamEvent>,
    waker: Option<Waker>,
    /// The sending side is gone.
    closed: bool,
}

#[derive(Default)]
struct Channel {
    state: Mutex<State>,
    ready: Condvar,
}

impl Channel {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The step loop's end of one request's channel; dropping it closes the stream.
pub(crate) struct Sink {
    chan: Arc<Channel>,
}

impl Sink {
    pub(crate) fn push(&self, event: StreamEvent) {
        let waker = {
            let mut s = self.chan.lock();
            s.events.push_back(event);
            s.waker.take()
        };
        self.chan.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.chan.lock();
            s.closed = true;
            s.waker.take()
        };
        self.chan.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A pair of ends for a new request.
pub(crate) fn channel() -> (Sink, Arc<ChannelHandle>) {
    let chan = Arc::new(Channel::default());
    (
        Sink { chan: chan.clone() },
        Arc::new(ChannelHandle { chan }),
    )
}

/// The receiving end, shared by the stream.
pub(crate) struct ChannelHandle {
    chan: Arc<Channel>,
}

/// The events of one request: tokens as they are generated, then one
/// [`StreamEvent::Finished`]. Iterate it (blocking), or `.next().await` it (async).
/// Dropping it before the finish cancels the request.
pub struct TokenStream {
    id: RequestId,
    handle: Arc<ChannelHandle>,
    commands: Sender<Command>,
    submitted: Instant,
    done: bool,
}

impl std::fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStream")
            .field("id", &self.id)
            .field("done", &self.done)
            .finish()
    }
}

impl TokenStream {
    pub(crate) fn new(
        id: RequestId,
        handle: Arc<ChannelHandle>,
        commands: Sender<Command>,
        submitted: Instant,
    ) -> Self {
        TokenStream {
            id,
            handle,
            commands,
            submitted,
            done: false,
        }
    }

    /// The request's id (for [`crate::Engine::cancel`]).
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Asks the engine to cancel this request; the stream then ends with
    /// [`StopReason::Cancelled`] (unless it finished first).
    pub fn cancel(&self) {
        // If the engine is gone the request is gone too.
        let _ = self.commands.send(Command::Cancel {
            id: self.id,
            reply: None,
        });
    }

    fn take(&mut self, event: Option<StreamEvent>) -> Option<StreamEvent> {
        match &event {
            Some(StreamEvent::Finished(_)) | None => self.done = true,
            Some(StreamEvent::Token(_)) => {}
        }
        event
    }

    /// The next event, waiting for it; `None` after the finish.
    pub fn next_blocking(&mut self) -> Option<StreamEvent> {
        if self.done {
            return None;
        }
        let chan = &self.handle.chan;
        let mut s = chan.lock();
        let event = loop {
            if let Some(e) = s.events.pop_front() {
                break Some(e);
            }
            if s.closed {
                break None;
            }
            s = chan.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        };
        drop(s);
        self.take(event)
    }

    /// Polls for the next event (for wrapping as a `futures::Stream`).
    pub fn poll_next_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<StreamEvent>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut s = self.handle.chan.lock();
        let event = if let Some(e) = s.events.pop_front() {
            Some(e)
        } else if s.closed {
            None
        } else {
            s.waker = Some(cx.waker().clone());
            return Poll::Pending;
        };
        drop(s);
        Poll::Ready(self.take(event))
    }

    /// The next event, asynchronously; `None` after the finish.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        poll_fn(|cx| self.poll_next_event(cx)).await
    }

    /// Waits for the whole request.
    pub fn wait(mut self) -> Completion {
        let mut c = Collector::new(self.id, self.submitted);
        while let Some(e) = self.next_blocking() {
            c.add(e);
        }
        c.finish()
    }

    /// Waits for the whole request, asynchronously.
    pub async fn collect(mut self) -> Completion {
        let mut c = Collector::new(self.id, self.submitted);
        while let Some(e) = self.next().await {
            c.add(e);
        }
        c.finish()
    }
}

impl Iterator for TokenStream {
    type Item = StreamEvent;

    fn next(&mut self) -> Option<StreamEvent> {
        self.next_blocking()
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        if !self.done {
            self.cancel();
        }
    }
}

struct Collector {
    completion: Completion,
    submitted: Instant,
    finished: bool,
}

impl Collector {
    fn new(id: RequestId, submitted: Instant) -> Self {
        Collector {
            completion: Completion {
                id,
                tokens: Vec::new(),
                logprobs: None,
                text: None,
                reason: StopReason::Failed {
                    message: "the engine stopped before the request finished".into(),
                },
                usage: Default::default(),
                time_to_first_token: None,
                total_time: Default::default(),
            },
            submitted,
            finished: false,
        }
    }

    fn add(&mut self, event: StreamEvent) {
        let c = &mut self.completion;
        match event {
            StreamEvent::Token(t) => {
                c.tokens.push(t.token);
                if let Some(lp) = t.logprobs {
                    c.logprobs.get_or_insert_with(Vec::new).push(lp);
                }
            }
            StreamEvent::Finished(f) => {
                if let Some(t) = f.timings {
                    c.time_to_first_token = t.time_to_first_token;
                    c.total_time = t.total;
                }
                c.reason = f.reason;
                c.usage = f.usage;
                c.text = f.text;
                self.finished = true;
            }
        }
    }

    fn finish(mut self) -> Completion {
        if !self.finished {
            // No finish event (the engine stopped): the time until the stream closed.
            self.completion.total_time = self.submitted.elapsed();
        }
        self.completion
    }
}
