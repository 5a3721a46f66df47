//! The compressor libraries (`compressor_library`): gzip (`envoy.compression.gzip.compressor`),
//! brotli and zstd. Each response chunk is compressed and flushed, and the stream finished at
//! its end, as Envoy's `Compressor::compress(data, Flush|Finish)` does; the bytes differ from
//! Envoy's zlib/brotli/zstd builds, the content does not.

use std::io::Write;

use bytes::Bytes;
use xds_client::pb::envoy::config::core::v3::TypedExtensionConfig;
use xds_client::pb::envoy::extensions::compression::brotli::compressor::v3::{
    brotli::EncoderMode, Brotli,
};
use xds_client::pb::envoy::extensions::compression::gzip::compressor::v3::{
    gzip::{CompressionLevel, CompressionStrategy},
    Gzip,
};
use xds_client::pb::envoy::extensions::compression::zstd::compressor::v3::{zstd as zstd_pb, Zstd};

use crate::{invalid, FilterConfigError};

const GZIP: &str = "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip";
const BROTLI: &str = "type.googleapis.com/envoy.extensions.compression.brotli.compressor.v3.Brotli";
const ZSTD: &str = "type.googleapis.com/envoy.extensions.compression.zstd.compressor.v3.Zstd";

/// A compiled library: what it makes per stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Library {
    Gzip { level: u32, window_bits: u8 },
    Brotli { params: BrotliParams },
    Zstd { level: i32, checksum: bool },
}

#[derive(Debug, Clone, PartialEq)]
pub struct BrotliParams {
    quality: i32,
    window_bits: i32,
    input_block_bits: i32,
    mode: brotli::enc::backward_references::BrotliEncoderMode,
    disable_literal_context_modeling: bool,
}

fn refuse(path: &str, field: &str) -> FilterConfigError {
    invalid(
        path,
        format!("'{field}' is not supported by Petrel's compressor libraries"),
    )
}

impl Library {
    pub fn compile(lib: &TypedExtensionConfig, path: &str) -> Result<Library, FilterConfigError> {
        let tp = format!("{path}.typed_config");
        let any = lib
            .typed_config
            .as_ref()
            .ok_or_else(|| invalid(&tp, "typed_config is required"))?;
        let registry = xds_client::TypeRegistry::global();
        let url = xds_client::TypeRegistry::effective_type_url(any);
        match url.as_str() {
            GZIP => {
                let g: Gzip = registry
                    .unpack(any)
                    .map_err(|e| invalid(&tp, e.to_string()))?;
                for (set, field) in [
                    (g.memory_level.is_some(), "memory_level"),
                    (g.chunk_size.is_some(), "chunk_size"),
                    (
                        g.compression_strategy != CompressionStrategy::DefaultStrategy as i32,
                        "compression_strategy",
                    ),
                ] {
                    if set {
                        return Err(refuse(&tp, field));
                    }
                }
                // zlib's Z_DEFAULT_COMPRESSION is level 6.
                let level = match g.compression_level {
                    l if l == CompressionLevel::DefaultCompression as i32 => 6,
                    l @ 1..=9 => l as u32,
                    _ => return Err(invalid(format!("{tp}.compression_level"), "unknown level")),
                };
                Ok(Library::Gzip {
                    level,
                    window_bits: g.window_bits.map_or(12, |w| w.value) as u8,
                })
            }
            BROTLI => {
                let b: Brotli = registry
                    .unpack(any)
                    .map_err(|e| invalid(&tp, e.to_string()))?;
                if b.chunk_size.is_some() {
                    return Err(refuse(&tp, "chunk_size"));
                }
                use brotli::enc::backward_references::BrotliEncoderMode as Mode;
                let mode = match EncoderMode::try_from(b.encoder_mode) {
                    Ok(EncoderMode::Default | EncoderMode::Generic) => Mode::BROTLI_MODE_GENERIC,
                    Ok(EncoderMode::Text) => Mode::BROTLI_MODE_TEXT,
                    Ok(EncoderMode::Font) => Mode::BROTLI_MODE_FONT,
                    Err(_) => return Err(invalid(format!("{tp}.encoder_mode"), "unknown mode")),
                };
                Ok(Library::Brotli {
                    params: BrotliParams {
                        quality: b.quality.map_or(3, |q| q.value) as i32,
                        window_bits: b.window_bits.map_or(18, |w| w.value) as i32,
                        input_block_bits: b.input_block_bits.map_or(24, |w| w.value) as i32,
                        mode,
                        disable_literal_context_modeling: b.disable_literal_context_modeling,
                    },
                })
            }
            ZSTD => {
                let z: Zstd = registry
                    .unpack(any)
                    .map_err(|e| invalid(&tp, e.to_string()))?;
                for (set, field) in [
                    (z.chunk_size.is_some(), "chunk_size"),
                    (z.dictionary.is_some(), "dictionary"),
                    (z.strategy != zstd_pb::Strategy::Default as i32, "strategy"),
                ] {
                    if set {
                        return Err(refuse(&tp, field));
                    }
                }
                Ok(Library::Zstd {
                    level: z.compression_level.map_or(3, |l| l.value) as i32,
                    checksum: z.enable_checksum,
                })
            }
            _ => Err(invalid(
                &tp,
                format!(
                    "compressor library {url} is not supported by Petrel (gzip, brotli, zstd are)"
                ),
            )),
        }
    }

    /// `Content-Encoding` the library writes.
    pub fn content_encoding(&self) -> &'static str {
        match self {
            Library::Gzip { .. } => "gzip",
            Library::Brotli { .. } => "br",
            Library::Zstd { .. } => "zstd",
        }
    }

    /// The library's part of the stat prefix (Envoy's `statsPrefix()`).
    pub fn stats_prefix(&self) -> &'static str {
        match self {
            Library::Gzip { .. } => "gzip.",
            Library::Brotli { .. } => "brotli.",
            Library::Zstd { .. } => "zstd.",
        }
    }

    /// A compressor for one stream.
    pub fn start(&self) -> Stream {
        match self {
            Library::Gzip { level, window_bits } => Stream::Gzip(flate2::Compress::new_gzip(
                flate2::Compression::new(*level),
                *window_bits,
            )),
            Library::Brotli { params } => {
                let p = brotli::enc::BrotliEncoderParams {
                    quality: params.quality,
                    lgwin: params.window_bits,
                    lgblock: params.input_block_bits,
                    mode: params.mode,
                    disable_literal_context_modeling: params.disable_literal_context_modeling
                        as i32,
                    ..Default::default()
                };
                Stream::Brotli(Box::new(brotli::CompressorWriter::with_params(
                    Vec::new(),
                    4096,
                    &p,
                )))
            }
            Library::Zstd { level, checksum } => {
                match ::zstd::stream::write::Encoder::new(Vec::new(), *level) {
                    Ok(mut e) => {
                        let _ = e.include_checksum(*checksum);
                        Stream::Zstd(Box::new(e))
                    }
                    Err(_) => Stream::Failed,
                }
            }
        }
    }
}

/// One stream's compressor.
pub enum Stream {
    Gzip(flate2::Compress),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(Box<::zstd::stream::write::Encoder<'static, Vec<u8>>>),
    /// Finished, or the library could not start: passes nothing more.
    Failed,
}

/// Runs zlib over `input` with `flush` until all of it is in and the flush is complete.
fn deflate(c: &mut flate2::Compress, mut input: &[u8], flush: flate2::FlushCompress) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() / 2 + 128);
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(4096);
        }
        let before = c.total_in();
        let Ok(status) = c.compress_vec(input, &mut out, flush) else {
            return out;
        };
        input = &input[(c.total_in() - before) as usize..];
        let finished = match flush {
            flate2::FlushCompress::Finish => status == flate2::Status::StreamEnd,
            // A flush is complete once zlib stops short of the space it had.
            _ => input.is_empty() && out.len() < out.capacity(),
        };
        if finished {
            return out;
        }
    }
}

impl Stream {
    /// Compresses one chunk and flushes it (`end`: finishes the stream).
    pub fn compress(&mut self, data: &[u8], end: bool) -> Bytes {
        let out = match self {
            Stream::Gzip(c) => deflate(
                c,
                data,
                if end {
                    flate2::FlushCompress::Finish
                } else {
                    flate2::FlushCompress::Sync
                },
            ),
            Stream::Brotli(w) => {
                let _ = w.write_all(data);
                if end {
                    match std::mem::replace(self, Stream::Failed) {
                        Stream::Brotli(w) => w.into_inner(),
                        _ => Vec::new(),
                    }
                } else {
                    let _ = w.flush();
                    std::mem::take(w.get_mut())
                }
            }
            Stream::Zstd(e) => {
                let _ = e.write_all(data);
                if end {
                    match std::mem::replace(self, Stream::Failed) {
                        Stream::Zstd(e) => e.finish().unwrap_or_default(),
                        _ => Vec::new(),
                    }
                } else {
                    let _ = e.flush();
                    std::mem::take(e.get_mut())
                }
            }
            Stream::Failed => Vec::new(),
        };
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn roundtrip(lib: Library) -> Vec<u8> {
        let mut s = lib.start();
        let mut wire = Vec::new();
        for chunk in [&b"hello "[..], b"compressed ", b"world"] {
            wire.extend_from_slice(&s.compress(chunk, false));
        }
        wire.extend_from_slice(&s.compress(b"", true));
        let mut out = Vec::new();
        match lib {
            Library::Gzip { .. } => {
                flate2::read::GzDecoder::new(wire.as_slice())
                    .read_to_end(&mut out)
                    .expect("gunzip");
            }
            Library::Brotli { .. } => {
                brotli::Decompressor::new(wire.as_slice(), 4096)
                    .read_to_end(&mut out)
                    .expect("unbrotli");
            }
            Library::Zstd { .. } => out = ::zstd::decode_all(wire.as_slice()).expect("unzstd"),
        }
        out
    }

    #[test]
    fn every_library_round_trips_flushed_chunks() {
        let brotli = BrotliParams {
            quality: 3,
            window_bits: 18,
            input_block_bits: 24,
            mode: brotli::enc::backward_references::BrotliEncoderMode::BROTLI_MODE_GENERIC,
            disable_literal_context_modeling: false,
        };
        for lib in [
            Library::Gzip {
                level: 6,
                window_bits: 12,
            },
            Library::Brotli { params: brotli },
            Library::Zstd {
                level: 3,
                checksum: true,
            },
        ] {
            assert_eq!(roundtrip(lib), b"hello compressed world");
        }
    }
}
