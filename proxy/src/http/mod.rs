//! The HTTP connection manager, its codecs and its local-reply path.
pub mod body;
pub mod conn_manager;
pub mod conn_manager_config;
pub mod date;
pub mod forward_client_cert;
pub mod grpc_stats;
pub mod h1;
pub mod header_scan;
pub mod istio_alpn;
pub mod local_reply;
pub mod local_reply_config;
pub mod path_normalization;
pub mod replay;
pub mod stream_log;
pub mod stream_timeouts;
