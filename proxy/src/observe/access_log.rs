//! Access loggers (`envoy.config.accesslog.v3.AccessLog`): `envoy.access_loggers.file`,
//! `stdout` and `stderr`, each a filter, a substitution format and a log file.
//!
//! A line is formatted on the worker that ends the stream and handed to the file's writer thread
//! over a channel, so the request path never waits on the disk (Envoy's file loggers buffer the
//! same way and flush every `--file-flush-interval-msec` or once 64 KiB are buffered). The
//! writer sleeps until the flush interval or until 64 KiB are queued: a line does not wake it
//! (a wakeup per line cost a context switch per request).

use crate::append_file::open_append;
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender, TryRecvError};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};
use std::time::Duration;

use xds_client::pb::envoy::config::accesslog::v3::{access_log, AccessLog as AccessLogPb};
use xds_client::pb::envoy::extensions::access_loggers::file::v3::{
    file_access_log::AccessLogFormat, FileAccessLog,
};
use xds_client::pb::envoy::extensions::access_loggers::stream::v3::{
    stderr_access_log, stdout_access_log, StderrAccessLog, StdoutAccessLog,
};

use super::access_log_filter::{FilterInput, LogFilter};
use super::formatter::{StreamValues, SubstitutionFormat, TextFormat};
use super::stats::Store;
use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::stat_struct;

/// Envoy's format when an access log names none.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Buffered bytes that trigger a write before the flush interval.
const FLUSH_SIZE: usize = 64 * 1024;

stat_struct!(FilesystemStats {
    counter flushed_by_timer,
    counter reopen_failed,
    counter write_buffered,
    counter write_completed,
    counter write_failed,
    gauge write_total_buffered,
});

/// How the formatted line is produced.
#[derive(Debug)]
enum LineFormat {
    Text(TextFormat),
    /// `log_format`, text or JSON (JSON lines end with a newline, as Envoy's do).
    Substitution(SubstitutionFormat),
}

/// One configured access log.
#[derive(Debug)]
pub struct AccessLog {
    filter: Option<LogFilter>,
    format: LineFormat,
    file: Arc<LogFile>,
}

/// A stream's access logs, compiled once per listener or connection manager.
pub type AccessLogs = Arc<[AccessLog]>;

const FILE: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// Compiles a list of access logs (`access_log` of a connection manager, TCP proxy, listener or
/// the admin server).
pub fn compile_all(
    logs: &[AccessLogPb],
    store: &Store,
    path: &str,
) -> Result<AccessLogs, ConfigError> {
    logs.iter()
        .enumerate()
        .map(|(i, l)| AccessLog::compile(l, store, &format!("{path}[{i}]")))
        .collect()
}

impl AccessLog {
    pub fn compile(pb: &AccessLogPb, store: &Store, path: &str) -> Result<AccessLog, ConfigError> {
        let mut rest = pb.clone();
        rest.name.clear();
        let filter = match rest.filter.take() {
            Some(f) => Some(LogFilter::compile(&f, &format!("{path}.filter"))?),
            None => None,
        };
        let any = match rest.config_type.take() {
            Some(access_log::ConfigType::TypedConfig(a)) => a,
            None => return Err(invalid(path, "typed_config is required")),
        };
        reject_unhandled(&rest, path)?;
        let tp = format!("{path}.typed_config");
        let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
        let registry = xds_client::TypeRegistry::global();
        let unpack_err = |e: xds_client::DecodeError| invalid(&tp, e.to_string());
        let (file_path, format) = match type_name {
            FILE => {
                let mut f: FileAccessLog = registry.unpack(&any).map_err(unpack_err)?;
                let file_path = std::mem::take(&mut f.path);
                if file_path.is_empty() {
                    return Err(invalid(
                        format!("{tp}.path"),
                        "value length must be at least 1 characters",
                    ));
                }
                let format = match f.access_log_format.take() {
                    None => LineFormat::Text(TextFormat::compile(DEFAULT_FORMAT, &tp)?),
                    Some(AccessLogFormat::LogFormat(s)) => LineFormat::Substitution(
                        SubstitutionFormat::compile(&s, &format!("{tp}.log_format"))?,
                    ),
                    // The deprecated forms: a text format string, or a JSON object.
                    Some(AccessLogFormat::Format(s)) => LineFormat::Text(TextFormat::compile(
                        if s.is_empty() { DEFAULT_FORMAT } else { &s },
                        &format!("{tp}.format"),
                    )?),
                    Some(AccessLogFormat::JsonFormat(j)) => {
                        LineFormat::Substitution(SubstitutionFormat::compile(
                            &xds_client::pb::envoy::config::core::v3::SubstitutionFormatString {
                                format: Some(xds_client::pb::envoy::config::core::v3::substitution_format_string::Format::JsonFormat(j)),
                                ..Default::default()
                            },
                            &format!("{tp}.json_format"),
                        )?)
                    }
                    Some(AccessLogFormat::TypedJsonFormat(_)) => {
                        return Err(ConfigError::Unsupported {
                            path: tp,
                            fields: "'typed_json_format'".into(),
                        })
                    }
                };
                reject_unhandled(&f, &tp)?;
                (file_path, format)
            }
            STDOUT | STDERR => {
                let (log_format, device) = if type_name == STDOUT {
                    let f: StdoutAccessLog = registry.unpack(&any).map_err(unpack_err)?;
                    (
                        f.access_log_format
                            .map(|stdout_access_log::AccessLogFormat::LogFormat(s)| s),
                        "/dev/stdout",
                    )
                } else {
                    let f: StderrAccessLog = registry.unpack(&any).map_err(unpack_err)?;
                    (
                        f.access_log_format
                            .map(|stderr_access_log::AccessLogFormat::LogFormat(s)| s),
                        "/dev/stderr",
                    )
                };
                let format = match log_format {
                    Some(s) => LineFormat::Substitution(SubstitutionFormat::compile(
                        &s,
                        &format!("{tp}.log_format"),
                    )?),
                    None => LineFormat::Text(TextFormat::compile(DEFAULT_FORMAT, &tp)?),
                };
                (device.to_string(), format)
            }
            _ => {
                return Err(ConfigError::UnsupportedExtension {
                    path: tp,
                    why: petrel_filters::extensions::refusal(type_name),
                    type_url: any.type_url.clone(),
                })
            }
        };
        let file = LogFile::open(&file_path, store).map_err(|e| invalid(path, e))?;
        Ok(AccessLog {
            filter,
            format,
            file,
        })
    }

    /// Writes the stream's line if the filter lets it through.
    pub fn log(&self, v: &StreamValues<'_>) {
        if let Some(f) = &self.filter {
            let input = FilterInput {
                response_code: v.response_code,
                response_flags: v.response_flags,
                request_headers: v.request_headers,
                duration: v.duration,
            };
            if !f.matches(&input) {
                return;
            }
        }
        let line = match &self.format {
            LineFormat::Text(t) => t.format(v),
            LineFormat::Substitution(s) => s.render(v).0,
        };
        self.file.write(line);
    }
}

/// Logs one stream to each access log.
pub fn log_all(logs: &[AccessLog], v: &StreamValues<'_>) {
    for l in logs {
        l.log(v);
    }
}

enum Msg {
    Line(String),
    Reopen,
    /// The last logger using the file is gone.
    Close,
}

/// An open log file shared by every access log that names its path, with its writer thread.
#[derive(Debug)]
pub struct LogFile {
    /// Unique for the process: keys each worker's sender.
    id: u64,
    tx: Mutex<Sender<Msg>>,
    /// Bytes sent and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    writer: std::thread::Thread,
    stats: FilesystemStats,
}

impl LogFile {
    /// Sends a control message and wakes the writer for it.
    fn control(&self, m: Msg) {
        let _ = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send(m);
        self.writer.unpark();
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        self.control(Msg::Close);
    }
}

static NEXT_FILE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Live log files by path, so loggers naming one path share one writer (as Envoy's access log
/// manager does) and `/reopen_logs` reaches them all.
static FILES: LazyLock<Mutex<HashMap<String, Weak<LogFile>>>> = LazyLock::new(Default::default);

/// `--file-flush-interval-msec`, set once at start.
static FLUSH_INTERVAL: OnceLock<Duration> = OnceLock::new();

pub fn set_flush_interval(d: Duration) {
    let _ = FLUSH_INTERVAL.set(d);
}

thread_local! {
    /// Each worker's own sender per file: sending never contends on a lock.
    static SENDERS: std::cell::RefCell<HashMap<u64, Sender<Msg>>> = Default::default();
}

impl LogFile {
    fn open(path: &str, store: &Store) -> Result<Arc<LogFile>, String> {
        let mut files = FILES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = files.get(path).and_then(Weak::upgrade) {
            return Ok(f);
        }
        let file = open_append(path).map_err(|e| format!("unable to open file '{path}': {e}"))?;
        let (tx, rx) = mpsc::channel();
        let stats = FilesystemStats::new(store, "filesystem.");
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            path: path.to_string(),
            file,
            buf: Vec::new(),
            stats: stats.clone(),
            queued: queued.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| format!("unable to start the writer of '{path}': {e}"))?;
        let f = Arc::new(LogFile {
            id: NEXT_FILE_ID.fetch_add(1, Ordering::Relaxed),
            tx: Mutex::new(tx),
            queued,
            writer: handle.thread().clone(),
            stats,
        });
        files.retain(|_, w| w.strong_count() > 0);
        files.insert(path.to_string(), Arc::downgrade(&f));
        Ok(f)
    }

    fn write(&self, line: String) {
        self.stats.write_buffered.inc();
        let n = line.len();
        SENDERS.with(|s| {
            let mut senders = s.borrow_mut();
            let tx = senders
                .entry(self.id)
                .or_insert_with(|| self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone());
            let _ = tx.send(Msg::Line(line));
        });
        // Only the line that crosses the size threshold wakes the writer.
        let before = self.queued.fetch_add(n, Ordering::Relaxed);
        if before < FLUSH_SIZE && before + n >= FLUSH_SIZE {
            self.writer.unpark();
        }
    }
}

/// Asks every open log file to reopen its path (`/reopen_logs`).
pub fn reopen_all() {
    let files = FILES.lock().unwrap_or_else(|e| e.into_inner());
    for f in files.values().filter_map(Weak::upgrade) {
        f.control(Msg::Reopen);
    }
}

struct Writer {
    path: String,
    file: std::fs::File,
    buf: Vec<u8>,
    stats: FilesystemStats,
    queued: Arc<AtomicUsize>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let interval = *FLUSH_INTERVAL.get_or_init(|| Duration::from_secs(10));
        let mut next_flush = std::time::Instant::now() + interval;
        loop {
            std::thread::park_timeout(
                next_flush.saturating_duration_since(std::time::Instant::now()),
            );
            loop {
                match rx.try_recv() {
                    Ok(Msg::Line(l)) => {
                        self.queued.fetch_sub(l.len(), Ordering::Relaxed);
                        self.buf.extend_from_slice(l.as_bytes());
                        if self.buf.len() >= FLUSH_SIZE {
                            self.flush();
                        }
                    }
                    Ok(Msg::Reopen) => {
                        self.flush();
                        match open_append(&self.path) {
                            Ok(f) => self.file = f,
                            Err(_) => self.stats.reopen_failed.inc(),
                        }
                    }
                    Ok(Msg::Close) | Err(TryRecvError::Disconnected) => {
                        self.flush();
                        return;
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            self.stats.write_total_buffered.set(self.buf.len() as i64);
            if std::time::Instant::now() >= next_flush {
                if !self.buf.is_empty() {
                    self.stats.flushed_by_timer.inc();
                    self.flush();
                }
                next_flush = std::time::Instant::now() + interval;
            }
        }
    }

    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        // A failed write (disk full, file gone) is counted and the data dropped, as Envoy does.
        match self.file.write_all(&self.buf) {
            Ok(()) => self.stats.write_completed.inc(),
            Err(_) => self.stats.write_failed.inc(),
        }
        self.buf.clear();
        self.stats.write_total_buffered.set(0);
    }
}
