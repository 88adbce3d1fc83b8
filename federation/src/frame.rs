//! Length-prefixed postcard frames on QUIC streams.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of postcard. Every read is
//! bounded by a maximum the caller states, so a peer can never make us allocate more than that
//! for one message; an oversized or undecodable frame is an error, never a panic.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame on a control or request stream. Most are small JSON documents; the big ones
/// are `system.run` results: 1 MiB of stdout and 1 MiB of stderr that JSON escaping can grow
/// up to six-fold, returned once as a value and once as text (the classic `payloadJSON`).
/// 32 MiB covers that worst case, near the classic gateway's 25 MiB `maxPayload`. Memory is
/// only committed as bytes actually arrive (see [`read_frame`]), so the bound costs nothing
/// for small frames.
pub const MAX_FRAME: usize = 32 * 1024 * 1024;

/// Largest hello frame: read before the peer is authenticated, so kept small.
pub const MAX_HELLO_FRAME: usize = 16 * 1024;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than the bound for this stream.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The bytes did not decode as the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// Transport error.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out =
        postcard::to_extend(msg, vec![0u8; 4]).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - 4;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Writes one frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T, max: usize) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = encode(msg, max)?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` if the stream ended cleanly before a new frame began.
pub async fn read_frame<R, T>(r: &mut R, max: usize) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len_buf[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    // Grow the buffer as bytes arrive instead of trusting the announced length: a peer that
    // announces 32 MiB and sends nothing costs us nothing.
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    let got = (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if got < len {
        return Err(FrameError::Truncated);
    }
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Decodes a datagram (no length prefix: the datagram is the frame).
pub fn decode_datagram<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(bytes).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Encodes a datagram.
pub fn encode_datagram<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    postcard::to_stdvec(msg).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Msg {
        a: u32,
        b: String,
    }

    #[tokio::test]
    async fn roundtrip_and_clean_eof() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let m = Msg {
            a: 7,
            b: "hi".into(),
        };
        write_frame(&mut a, &m, 1024).await.unwrap();
        drop(a);
        let got: Option<Msg> = read_frame(&mut b, 1024).await.unwrap();
        assert_eq!(got, Some(m));
        let end: Option<Msg> = read_frame(&mut b, 1024).await.unwrap();
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn oversized_truncated_and_garbage_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&(10_000_000u32).to_be_bytes()).await.unwrap();
        let r: Result<Option<Msg>, _> = read_frame(&mut b, 1024).await;
        assert!(matches!(r, Err(FrameError::TooLarge { .. })));

        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
        drop(a);
        let r: Result<Option<Msg>, _> = read_frame(&mut b, 1024).await;
        assert!(matches!(r, Err(FrameError::Truncated)));

        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
        let r: Result<Option<Msg>, _> = read_frame(&mut b, 1024).await;
        assert!(matches!(r, Err(FrameError::Malformed(_))));

        let big = Msg {
            a: 1,
            b: "x".repeat(2000),
        };
        assert!(matches!(
            encode(&big, 1024),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
