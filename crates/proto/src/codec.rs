//! The protobuf codec of every generated service and client: prost's, except that a
//! message that does not decode is INVALID_ARGUMENT (the client sent bad bytes) rather
//! than tonic-prost's INTERNAL, which would blame the server.

use std::marker::PhantomData;

use tonic::{
    codec::{BufferSettings, Codec as TonicCodec, DecodeBuf, Decoder},
    Status,
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ClientErrorDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ClientErrorDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// prost's decoder with undecodable bytes reported as INVALID_ARGUMENT, naming the type.
#[derive(Debug, Clone)]
pub struct ClientErrorDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for ClientErrorDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|e| {
            let ty = std::any::type_name::<U>()
                .rsplit("::")
                .next()
                .unwrap_or("message");
            Status::invalid_argument(format!(
                "the message is not a valid {ty} in protobuf encoding: {}",
                e.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
