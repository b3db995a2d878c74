//! An ordered, bidirectional channel of typed messages over one QUIC stream.
//!
//! `Channel<Out, In>` sends `Out` and receives `In`; the peer holds a `Channel<In, Out>`. Each
//! message is one [frame](crate::frame). [`Channel::split`] gives a sender and a receiver half
//! that can live in different tasks; [`ChannelSender::finish`] ends the sending direction
//! cleanly, which the peer's [`ChannelReceiver::recv`] sees as `None`.
//!
//! QUIC tells the peer about a new stream only when data arrives on it, so [`Channel::open`]
//! writes one empty frame (a header with a zero-length payload) and [`Channel::accept`] reads it.
//! Either side may then speak first.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame::HEADER_LEN;
use crate::{FrameCodec, NetError};

/// Both halves of a channel.
pub struct Channel<Out, In> {
    sender: ChannelSender<Out>,
    receiver: ChannelReceiver<In>,
}

/// The sending half of a [`Channel`].
pub struct ChannelSender<Out> {
    send: quinn::SendStream,
    codec: FrameCodec,
    _out: PhantomData<fn(&Out)>,
}

/// The receiving half of a [`Channel`].
pub struct ChannelReceiver<In> {
    recv: quinn::RecvStream,
    codec: FrameCodec,
    _in: PhantomData<fn() -> In>,
}

impl<Out: Serialize, In: DeserializeOwned> Channel<Out, In> {
    /// Opens a new stream on `conn` and announces it to the peer.
    pub async fn open(conn: &quinn::Connection, codec: FrameCodec) -> Result<Self, NetError> {
        let (mut send, recv) = conn.open_bi().await?;
        codec.write_frame(&mut send, &()).await?;
        Ok(Channel::from_streams(send, recv, codec))
    }

    /// Waits for the peer to [`open`](Channel::open) a channel on `conn`.
    pub async fn accept(conn: &quinn::Connection, codec: FrameCodec) -> Result<Self, NetError> {
        let (send, mut recv) = conn.accept_bi().await?;
        match codec.read_frame::<()>(&mut recv).await? {
            Some(()) => Ok(Channel::from_streams(send, recv, codec)),
            None => Err(NetError::Truncated { expected: HEADER_LEN, got: 0 }),
        }
    }

    /// A channel over streams the caller opened (no opening frame is sent or expected).
    pub fn from_streams(send: quinn::SendStream, recv: quinn::RecvStream, codec: FrameCodec) -> Self {
        Channel {
            sender: ChannelSender { send, codec, _out: PhantomData },
            receiver: ChannelReceiver { recv, codec, _in: PhantomData },
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Out) -> Result<(), NetError> {
        self.sender.send(msg).await
    }

    /// The next message; `None` once the peer finished its sending direction.
    pub async fn recv(&mut self) -> Result<Option<In>, NetError> {
        self.receiver.recv().await
    }

    /// The two halves, to send and receive from different tasks.
    pub fn split(self) -> (ChannelSender<Out>, ChannelReceiver<In>) {
        (self.sender, self.receiver)
    }
}

impl<Out: Serialize> ChannelSender<Out> {
    /// Sends one message.
    pub async fn send(&mut self, msg: &Out) -> Result<(), NetError> {
        self.codec.write_frame(&mut self.send, msg).await
    }

    /// Ends this direction: the peer receives every message sent so far, then `None`.
    pub fn finish(&mut self) -> Result<(), NetError> {
        self.send.finish()?;
        Ok(())
    }
}

impl<In: DeserializeOwned> ChannelReceiver<In> {
    /// The next message; `None` once the peer finished its sending direction.
    pub async fn recv(&mut self) -> Result<Option<In>, NetError> {
        self.codec.read_frame(&mut self.recv).await
    }
}
