//! Envoy-style application logging: a global level, per-component levels (`--component-log-level`,
//! `/logging?name=level`), spdlog-style `--log-format` patterns, and `--log-path`.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

/// Level names Envoy accepts, in order.
pub const LEVELS: &[&str] = &[
    "trace", "debug", "info", "warning", "warn", "error", "critical", "off",
];

/// Envoy's logger names (the ones Petrel logs under), as `/logging` lists them.
pub const COMPONENTS: &[&str] = &[
    "admin",
    "config",
    "conn_handler",
    "connection",
    "http",
    "http2",
    "main",
    "misc",
    "pool",
    "router",
    "upstream",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
    Off = 6,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s {
            "trace" => Level::Trace,
            "debug" => Level::Debug,
            "info" => Level::Info,
            "warning" | "warn" => Level::Warn,
            "error" => Level::Error,
            "critical" => Level::Critical,
            "off" => Level::Off,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warning",
            Level::Error => "error",
            Level::Critical => "critical",
            Level::Off => "off",
        }
    }
    fn from_u8(v: u8) -> Level {
        match v {
            0 => Level::Trace,
            1 => Level::Debug,
            2 => Level::Info,
            3 => Level::Warn,
            4 => Level::Error,
            5 => Level::Critical,
            _ => Level::Off,
        }
    }
}

pub struct Logger {
    levels: Vec<AtomicU8>,
    /// The line pattern; the bootstrap's `application_log_config` may replace it after start.
    pattern: arc_swap::ArcSwap<String>,
    sink: Mutex<Box<dyn Write + Send>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Envoy's default `--log-format`.
pub const DEFAULT_FORMAT: &str = "[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v";

/// Installs the process logger. Later calls are ignored (tests start many servers).
pub fn init(
    level: &str,
    components: &[(String, String)],
    pattern: Option<&str>,
    path: Option<&str>,
) -> std::io::Result<()> {
    let base = Level::parse(level).unwrap_or(Level::Info) as u8;
    let levels: Vec<AtomicU8> = COMPONENTS.iter().map(|_| AtomicU8::new(base)).collect();
    for (c, l) in components {
        if let (Some(i), Some(l)) = (COMPONENTS.iter().position(|n| n == c), Level::parse(l)) {
            levels[i].store(l as u8, Ordering::Relaxed);
        }
    }
    let sink: Box<dyn Write + Send> = match path {
        Some(p) => Box::new(crate::append_file::open_append(p)?),
        None => Box::new(std::io::stderr()),
    };
    let _ = LOGGER.set(Logger {
        levels,
        pattern: arc_swap::ArcSwap::from_pointee(pattern.unwrap_or(DEFAULT_FORMAT).to_string()),
        sink: Mutex::new(sink),
    });
    Ok(())
}

/// Replaces the line pattern (`application_log_config.log_format.text_format`).
pub fn set_pattern(pattern: &str) {
    if let Some(l) = LOGGER.get() {
        l.pattern.store(std::sync::Arc::new(pattern.to_string()));
    }
}

fn component_index(c: &str) -> usize {
    COMPONENTS.iter().position(|n| *n == c).unwrap_or(0)
}

pub fn enabled(component: &str, level: Level) -> bool {
    match LOGGER.get() {
        Some(l) => level as u8 >= l.levels[component_index(component)].load(Ordering::Relaxed),
        None => level >= Level::Warn,
    }
}

/// Sets one component's level (`/logging?http=debug`); false if the name is unknown.
pub fn set_level(component: &str, level: Level) -> bool {
    let Some(l) = LOGGER.get() else { return false };
    match COMPONENTS.iter().position(|n| *n == component) {
        Some(i) => {
            l.levels[i].store(level as u8, Ordering::Relaxed);
            true
        }
        None => false,
    }
}

/// Sets every component's level (`/logging?level=debug`).
pub fn set_all(level: Level) {
    if let Some(l) = LOGGER.get() {
        for a in &l.levels {
            a.store(level as u8, Ordering::Relaxed);
        }
    }
}

/// `(component, level)` for every component, for `/logging`.
pub fn levels() -> Vec<(&'static str, Level)> {
    COMPONENTS
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let v = LOGGER
                .get()
                .map(|l| l.levels[i].load(Ordering::Relaxed))
                .unwrap_or(Level::Info as u8);
            (*c, Level::from_u8(v))
        })
        .collect()
}

/// Renders one line with an spdlog pattern (the subset Envoy and Istio use).
pub fn render(
    pattern: &str,
    component: &str,
    level: Level,
    file: &str,
    line: u32,
    msg: &str,
) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (y, mo, d, h, mi, s) = civil_from_unix(secs);
    let mut out = String::with_capacity(pattern.len() + msg.len() + 32);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&format!("{y:04}")),
            Some('m') => out.push_str(&format!("{mo:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('T') => out.push_str(&format!("{h:02}:{mi:02}:{s:02}")),
            Some('e') => out.push_str(&format!("{:03}", now.subsec_millis())),
            Some('f') => out.push_str(&format!("{:06}", now.subsec_micros())),
            Some('l') => out.push_str(level.name()),
            Some('n') => out.push_str(component),
            Some('g') | Some('s') => out.push_str(file),
            Some('#') => out.push_str(&line.to_string()),
            Some('v') => out.push_str(msg),
            Some('t') => out.push_str(&thread_id().to_string()),
            Some('P') => out.push_str(&std::process::id().to_string()),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn thread_id() -> u64 {
    // spdlog prints the kernel thread id; a per-thread number tells threads apart just as well
    // without reaching for libc.
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
    ID.with(|i| *i)
}

pub use petrel_filters::time::civil_from_unix;

pub fn write(component: &str, level: Level, file: &str, line: u32, msg: &str) {
    let pattern = LOGGER.get().map(|l| l.pattern.load_full());
    let pattern = pattern.as_deref().map_or(DEFAULT_FORMAT, |p| p.as_str());
    let mut text = render(pattern, component, level, file, line, msg);
    text.push('\n');
    match LOGGER.get() {
        Some(l) => {
            if let Ok(mut s) = l.sink.lock() {
                let _ = s.write_all(text.as_bytes());
            }
        }
        None => eprint!("{text}"),
    }
}

/// `plog!(info, "http", "…", args)`.
#[macro_export]
macro_rules! plog {
    ($lvl:ident, $comp:expr, $($arg:tt)*) => {{
        let level = $crate::logging::plog_level!($lvl);
        if $crate::logging::enabled($comp, level) {
            $crate::logging::write($comp, level, file!(), line!(), &format!($($arg)*));
        }
    }};
}

#[macro_export]
#[doc(hidden)]
macro_rules! __plog_level {
    (trace) => {
        $crate::logging::Level::Trace
    };
    (debug) => {
        $crate::logging::Level::Debug
    };
    (info) => {
        $crate::logging::Level::Info
    };
    (warn) => {
        $crate::logging::Level::Warn
    };
    (error) => {
        $crate::logging::Level::Error
    };
    (critical) => {
        $crate::logging::Level::Critical
    };
}
pub use __plog_level as plog_level;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_istio_pattern() {
        let s = render(
            "%l\tenvoy %n %g:%#\t%v",
            "http",
            Level::Warn,
            "a.rs",
            7,
            "hi",
        );
        assert_eq!(s, "warning\tenvoy http a.rs:7\thi");
    }
}
