//! Istio's TCP metadata exchange (`envoy.tcp.metadataexchange.config.MetadataExchange`; the
//! `istio.metadata_exchange` network filter downstream, and the cluster's upstream filter of the
//! same config): when the connection's TLS negotiated the configured ALPN (Istio's
//! `istio-peer-exchange`), each side writes who it is ahead of the connection's bytes and reads
//! who the other side is off the front of what it receives, for Istio's TCP telemetry.
//!
//! The frame is a 4-byte magic (`0x3D230467`) and a 4-byte length, both big-endian, then a
//! `google.protobuf.Any` holding a `Struct` with `x-envoy-peer-metadata` (the node's workload
//! metadata) and `x-envoy-peer-metadata-id` (the node id). A peer that did not negotiate the ALPN,
//! or whose first bytes are no frame, is an unknown peer and its bytes pass untouched.
//!
//! Istio writes its frame when the first bytes move either way; Petrel writes it as soon as the
//! connection is up (the same bytes, earlier: a connection that never carries data still gets
//! the peer's frame).

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use petrel_filters::workload_metadata::WorkloadMetadata;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use xds_client::pb::envoy::config::core::v3::Node;
use xds_client::pb::google::protobuf::{value::Kind, Any, Struct, Value};

use crate::config::{invalid, ConfigError};
use crate::observe::stats::Store;
use crate::stat_struct;

pub const TYPE_URL: &str = "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange";
const MAGIC: u32 = 0x3D23_0467;
const HEADER_LEN: usize = 8;
const STRUCT_URL: &str = "type.googleapis.com/google.protobuf.Struct";
const PEER_METADATA: &str = "x-envoy-peer-metadata";
const PEER_ID: &str = "x-envoy-peer-metadata-id";
/// A peer's frame larger than this is not believed (Istio's are a few hundred bytes).
const MAX_FRAME: usize = 64 * 1024;

stat_struct!(MxStats {
    counter alpn_protocol_found,
    counter alpn_protocol_not_found,
    counter initial_header_not_found,
    counter header_not_found,
    counter metadata_added,
});

/// `envoy.tcp.metadataexchange.config.MetadataExchange`.
#[derive(Clone, PartialEq, prost::Message)]
struct Config {
    #[prost(string, tag = "1")]
    protocol: String,
    #[prost(bool, tag = "2")]
    enable_discovery: bool,
    #[prost(string, repeated, tag = "3")]
    additional_labels: Vec<String>,
}

impl prost::Name for Config {
    const NAME: &'static str = "MetadataExchange";
    const PACKAGE: &'static str = "envoy.tcp.metadataexchange.config";
}

#[derive(Debug)]
pub struct MetadataExchange {
    /// The ALPN protocol the exchange runs under.
    pub protocol: String,
    additional_labels: Vec<String>,
    /// This proxy's frame, made once.
    frame: Bytes,
    pub stats: MxStats,
}

impl MetadataExchange {
    pub fn compile(
        any: &Any,
        node: &Node,
        store: &Store,
        path: &str,
    ) -> Result<MetadataExchange, ConfigError> {
        let cfg: Config = xds_client::TypeRegistry::global()
            .unpack(any)
            .map_err(|e| invalid(path, format!("cannot decode MetadataExchange: {e}")))?;
        if cfg.protocol.is_empty() {
            return Err(invalid(
                format!("{path}.protocol"),
                "a protocol is required",
            ));
        }
        // `enable_discovery` falls back to Istio's workload metadata discovery, whose bootstrap
        // extension Petrel refuses: as in istio-proxy without it, the fallback finds no one.
        let local = WorkloadMetadata::from_struct(
            &node.metadata.clone().unwrap_or_default(),
            &cfg.additional_labels,
        );
        Ok(MetadataExchange {
            frame: frame(&local, &node.id),
            protocol: cfg.protocol,
            additional_labels: cfg.additional_labels,
            stats: MxStats::new(store, "metadata_exchange."),
        })
    }

    /// The frame to send first when the connection negotiated `alpn`, counting what Istio
    /// counts; `None` (an unknown peer) otherwise.
    pub fn start(&self, alpn: &str) -> Option<Bytes> {
        if alpn != self.protocol {
            self.stats.alpn_protocol_not_found.inc();
            return None;
        }
        self.stats.alpn_protocol_found.inc();
        self.stats.metadata_added.inc();
        Some(self.frame.clone())
    }

    /// Reads the peer's frame off the front of what `from` sends, starting with `buf`; the bytes
    /// past the frame (or all of them, when there is none) stay in `buf`.
    pub async fn read_peer_from<R: AsyncRead + Unpin>(
        &self,
        from: &mut R,
        buf: &mut BytesMut,
    ) -> Option<Arc<WorkloadMetadata>> {
        let mut eof = false;
        loop {
            match self.read_peer(buf, eof) {
                PeerRead::NeedMore => {}
                PeerRead::Unknown => return None,
                PeerRead::Found(p) => return Some(p),
            }
            match from.read_buf(buf).await {
                Ok(0) | Err(_) => eof = true,
                Ok(_) => {}
            }
        }
    }

    /// The whole exchange with a downstream that has not spoken yet (ahead of the connection
    /// manager): our frame out, the peer's in. `None`: no exchange, or no frame from the peer.
    pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
        alpn: &str,
    ) -> Option<Arc<WorkloadMetadata>> {
        let frame = self.start(alpn)?;
        stream.write_all(&frame).await.ok()?;
        self.read_peer_from(stream, buf).await
    }

    /// Reads the peer's frame off the front of `buf`. `eof`: nothing more will come.
    pub fn read_peer(&self, buf: &mut BytesMut, eof: bool) -> PeerRead {
        if buf.len() < HEADER_LEN {
            if eof {
                return PeerRead::Unknown;
            }
            self.stats.initial_header_not_found.inc();
            return PeerRead::NeedMore;
        }
        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if magic != MAGIC {
            self.stats.initial_header_not_found.inc();
            return PeerRead::Unknown;
        }
        let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        if len > MAX_FRAME {
            self.stats.header_not_found.inc();
            return PeerRead::Unknown;
        }
        if buf.len() < HEADER_LEN + len {
            return if eof {
                PeerRead::Unknown
            } else {
                PeerRead::NeedMore
            };
        }
        let Some(peer) = parse(&buf[HEADER_LEN..HEADER_LEN + len], &self.additional_labels) else {
            self.stats.header_not_found.inc();
            buf.advance(HEADER_LEN);
            return PeerRead::Unknown;
        };
        buf.advance(HEADER_LEN + len);
        PeerRead::Found(Arc::new(peer))
    }
}

/// What reading the peer's frame came to.
#[derive(Debug, PartialEq)]
pub enum PeerRead {
    NeedMore,
    /// No frame: the peer stays unknown and the bytes are the connection's.
    Unknown,
    Found(Arc<WorkloadMetadata>),
}

fn frame(local: &WorkloadMetadata, id: &str) -> Bytes {
    let mut fields = std::collections::HashMap::new();
    fields.insert(
        PEER_METADATA.to_string(),
        Value {
            kind: Some(Kind::StructValue(local.to_struct())),
        },
    );
    if !id.is_empty() {
        fields.insert(
            PEER_ID.to_string(),
            Value {
                kind: Some(Kind::StringValue(id.to_string())),
            },
        );
    }
    let any = Any {
        type_url: STRUCT_URL.into(),
        value: petrel_filters::workload_metadata::deterministic(&Struct { fields }),
    }
    .encode_to_vec();
    let mut out = BytesMut::with_capacity(HEADER_LEN + any.len());
    out.put_u32(MAGIC);
    out.put_u32(any.len() as u32);
    out.extend_from_slice(&any);
    out.freeze()
}

fn parse(frame: &[u8], additional_labels: &[String]) -> Option<WorkloadMetadata> {
    let any = Any::decode(frame).ok()?;
    let s = Struct::decode(any.value.as_slice()).ok()?;
    match s.fields.get(PEER_METADATA)?.kind.as_ref()? {
        Kind::StructValue(m) => Some(WorkloadMetadata::from_struct(m, additional_labels)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(workload: &str) -> MetadataExchange {
        let node: Node = xds_client::TypeRegistry::global()
            .from_json(
                &serde_json::json!({"id": format!("{workload}-id"), "metadata": {
                    "WORKLOAD_NAME": workload, "NAMESPACE": "default",
                    "LABELS": {"app": workload, "role": "r"}}}),
                false,
            )
            .unwrap();
        let any: Any = xds_client::TypeRegistry::global()
            .from_json(
                &serde_json::json!({"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                    "type_url": "envoy.tcp.metadataexchange.config.MetadataExchange",
                    "value": {"protocol": "istio-peer-exchange", "additional_labels": ["role"]}}),
                false,
            )
            .unwrap();
        MetadataExchange::compile(&any, &node, &Store::default(), "f").unwrap()
    }

    #[test]
    fn frames_cross_and_leave_the_data() {
        let (client, server) = (mx("productpage-v1"), mx("ratings-v1"));
        let frame = client.start("istio-peer-exchange").unwrap();
        assert_eq!(&frame[..4], &[0x3D, 0x23, 0x04, 0x67]);
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&frame);
        wire.extend_from_slice(b"world\n");
        // Byte by byte, as a slow peer sends it.
        let mut buf = BytesMut::new();
        let mut got = None;
        for b in wire.iter() {
            buf.put_u8(*b);
            match server.read_peer(&mut buf, false) {
                PeerRead::NeedMore => continue,
                other => {
                    got = Some(other);
                    break;
                }
            }
        }
        let Some(PeerRead::Found(peer)) = got else {
            panic!("{got:?}")
        };
        assert_eq!(peer.workload_name, "productpage-v1");
        assert_eq!(peer.labels, vec![("role".into(), "r".into())]);
        assert!(buf.is_empty());
        assert_eq!(client.stats.metadata_added.value(), 1);
    }

    #[test]
    fn no_frame_is_an_unknown_peer() {
        let server = mx("ratings-v1");
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert_eq!(server.read_peer(&mut buf, false), PeerRead::Unknown);
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
        let mut short = BytesMut::from(&b"hi"[..]);
        assert_eq!(server.read_peer(&mut short, true), PeerRead::Unknown);
        assert_eq!(server.start("h2"), None);
        assert_eq!(server.stats.alpn_protocol_not_found.value(), 1);
        // A frame whose body is not an Any of a Struct.
        let mut bad = BytesMut::new();
        bad.put_u32(MAGIC);
        bad.put_u32(3);
        bad.extend_from_slice(b"\xff\xff\xff");
        assert_eq!(server.read_peer(&mut bad, false), PeerRead::Unknown);
        assert_eq!(server.stats.header_not_found.value(), 1);
    }
}
