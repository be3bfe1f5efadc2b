//! Keeping something alive for exactly as long as a response body: a reply's byte permit
//! until it is written, a connection's open-call mark until the call ends.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// `resp` with `guard` dropped when its body ends (or fails, or is dropped).
pub fn until_body_ends<G: Send + 'static>(
    resp: http::Response<tonic::body::Body>,
    guard: G,
) -> http::Response<tonic::body::Body> {
    resp.map(|inner| {
        tonic::body::Body::new(Holding {
            inner,
            guard: Some(guard),
        })
    })
}

pin_project_lite::pin_project! {
    struct Holding<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Body for Holding<B, G>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &polled {
            *this.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
