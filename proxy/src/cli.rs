//! Envoy's command line, flag for flag (TCLAP syntax: `--flag value`, `--flag=value`, `-c value`).
//!
//! Every flag Envoy knows is either honoured here or refused with a message naming it; none is
//! accepted and silently dropped.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Validate,
    InitOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainStrategy {
    Gradual,
    Immediate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpVersion {
    V4,
    V6,
}

/// Parsed command line (Envoy's `OptionsImpl`).
#[derive(Debug, Clone)]
pub struct Options {
    pub config_path: Option<String>,
    pub config_yaml: Option<String>,
    pub mode: Mode,
    pub concurrency: u32,
    pub log_level: String,
    pub component_log_level: Vec<(String, String)>,
    pub log_format: Option<String>,
    pub log_path: Option<String>,
    pub drain_time_s: u32,
    pub drain_strategy: DrainStrategy,
    pub parent_shutdown_time_s: u32,
    pub local_address_ip_version: IpVersion,
    pub file_flush_interval_msec: u32,
    pub allow_unknown_static_fields: bool,
    pub reject_unknown_dynamic_fields: bool,
    pub ignore_unknown_dynamic_fields: bool,
    pub service_cluster: Option<String>,
    pub service_node: Option<String>,
    pub service_zone: Option<String>,
    pub base_id: u32,
    pub admin_address_path: Option<String>,
    /// The command line as given, for `/server_info`.
    pub argv: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config_path: None,
            config_yaml: None,
            mode: Mode::Serve,
            concurrency: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            log_level: "info".into(),
            component_log_level: Vec::new(),
            log_format: None,
            log_path: None,
            drain_time_s: 600,
            drain_strategy: DrainStrategy::Gradual,
            parent_shutdown_time_s: 900,
            local_address_ip_version: IpVersion::V4,
            file_flush_interval_msec: 10_000,
            allow_unknown_static_fields: false,
            reject_unknown_dynamic_fields: false,
            ignore_unknown_dynamic_fields: false,
            service_cluster: None,
            service_node: None,
            service_zone: None,
            base_id: 0,
            admin_address_path: None,
            argv: Vec::new(),
        }
    }
}

/// What the command line asks for besides serving.
#[derive(Debug, PartialEq)]
pub enum Command {
    Run(Box<Options>),
    Version,
    Help,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum CliError {
    /// Envoy's TCLAP wording, so scripts that grep it keep working.
    #[error("PARSE ERROR: Argument: {0}\n             Couldn't find match for argument")]
    Unknown(String),
    #[error("PARSE ERROR: Argument: ({flag})\n             Couldn't read argument value from string '{value}'")]
    BadValue { flag: String, value: String },
    #[error("PARSE ERROR: Argument: {0}\n             Missing a value for this argument!")]
    MissingValue(String),
    #[error("error: {flag} '{value}' is not supported by Petrel: {why}")]
    Unsupported {
        flag: String,
        value: String,
        why: &'static str,
    },
}

impl PartialEq for Options {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

/// Flags Envoy accepts that only concern hot restart, shared memory or core dumps: Petrel has no
/// hot restart, so they have no effect to honour, exactly as when Envoy runs with
/// `--disable-hot-restart` (which pilot-agent always passes).
const HOT_RESTART_SWITCHES: &[&str] = &[
    "--disable-hot-restart",
    "--use-dynamic-base-id",
    "--skip-hot-restart-on-no-parent",
    "--skip-hot-restart-parent-stats",
    // Petrel writes no deprecation warnings, so suppressing them is already the behaviour.
    "--skip-deprecated-logs",
];

/// Envoy flags Petrel refuses, with why.
const REFUSED_SWITCHES: &[(&str, &str)] = &[
    ("--enable-core-dump", "core dump control is not implemented"),
    (
        "--cpuset-threads",
        "cpuset-derived concurrency is not implemented",
    ),
    ("--enable-mutex-tracing", "there are no mutexes to trace"),
    (
        "--enable-fine-grain-logging",
        "fine-grain logging is not implemented",
    ),
    (
        "--log-format-escaped",
        "escaped log format is not implemented",
    ),
    ("--log-stacktrace-single-entry", "not implemented"),
    ("--hot-restart-version", "Petrel has no hot restart"),
];
const REFUSED_VALUED: &[(&str, &str)] = &[
    ("--stats-tag", "command-line stats tags are not implemented"),
    ("--socket-mode", "hot-restart sockets are not implemented"),
    ("--socket-path", "hot-restart sockets are not implemented"),
    ("--disable-extensions", "not implemented"),
    ("--file-flush-min-size-kb", "not implemented"),
    ("--base-id-path", "Petrel has no hot restart"),
];

fn parse_u32(flag: &str, v: &str) -> Result<u32, CliError> {
    v.parse().map_err(|_| CliError::BadValue {
        flag: flag.to_string(),
        value: v.to_string(),
    })
}

/// Parses Envoy's command line (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, CliError> {
    let args: Vec<String> = args.into_iter().collect();
    let mut o = Options {
        argv: args.clone(),
        ..Options::default()
    };
    let mut i = 0;
    while i < args.len() {
        let raw = &args[i];
        i += 1;
        let (flag, inline) = match raw.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (raw.clone(), None),
        };
        let switch = |inline: &Option<String>| -> Result<(), CliError> {
            match inline {
                Some(v) => Err(CliError::BadValue {
                    flag: flag.clone(),
                    value: v.clone(),
                }),
                None => Ok(()),
            }
        };
        match flag.as_str() {
            "--version" => return Ok(Command::Version),
            "-h" | "--help" => return Ok(Command::Help),
            "--" | "--ignore_rest" => break,
            "--allow-unknown-static-fields" | "--allow-unknown-fields" => {
                switch(&inline)?;
                o.allow_unknown_static_fields = true;
                continue;
            }
            "--reject-unknown-dynamic-fields" => {
                switch(&inline)?;
                o.reject_unknown_dynamic_fields = true;
                continue;
            }
            "--ignore-unknown-dynamic-fields" => {
                switch(&inline)?;
                o.ignore_unknown_dynamic_fields = true;
                continue;
            }
            f if HOT_RESTART_SWITCHES.contains(&f) => {
                switch(&inline)?;
                continue;
            }
            f => {
                if let Some((_, why)) = REFUSED_SWITCHES.iter().find(|(n, _)| *n == f) {
                    return Err(CliError::Unsupported {
                        flag: flag.clone(),
                        value: String::new(),
                        why,
                    });
                }
            }
        }
        // Everything below takes a value.
        let value = match inline {
            Some(v) => v,
            None => {
                let known = matches!(
                    flag.as_str(),
                    "-c" | "--config-path"
                        | "--config-yaml"
                        | "--mode"
                        | "--concurrency"
                        | "-l"
                        | "--log-level"
                        | "--component-log-level"
                        | "--log-format"
                        | "--log-path"
                        | "--drain-time-s"
                        | "--drain-strategy"
                        | "--parent-shutdown-time-s"
                        | "--local-address-ip-version"
                        | "--file-flush-interval-msec"
                        | "--service-cluster"
                        | "--service-node"
                        | "--service-zone"
                        | "--base-id"
                        | "--restart-epoch"
                        | "-a"
                        | "--admin-address-path"
                ) || REFUSED_VALUED.iter().any(|(n, _)| *n == flag);
                if !known {
                    return Err(CliError::Unknown(flag));
                }
                let Some(v) = args.get(i) else {
                    return Err(CliError::MissingValue(flag));
                };
                i += 1;
                v.clone()
            }
        };
        match flag.as_str() {
            "-c" | "--config-path" => o.config_path = Some(value),
            "--config-yaml" => o.config_yaml = Some(value),
            "--mode" => {
                o.mode = match value.as_str() {
                    "serve" => Mode::Serve,
                    "validate" => Mode::Validate,
                    "init_only" => Mode::InitOnly,
                    _ => return Err(CliError::BadValue { flag, value }),
                }
            }
            "--concurrency" => o.concurrency = parse_u32(&flag, &value)?.max(1),
            "-l" | "--log-level" => {
                if !crate::logging::LEVELS.contains(&value.as_str()) {
                    return Err(CliError::BadValue { flag, value });
                }
                o.log_level = value
            }
            "--component-log-level" => {
                for part in value.split(',').filter(|p| !p.is_empty()) {
                    let Some((c, l)) = part.split_once(':') else {
                        return Err(CliError::BadValue { flag, value });
                    };
                    if !crate::logging::LEVELS.contains(&l) {
                        return Err(CliError::BadValue { flag, value });
                    }
                    o.component_log_level.push((c.to_string(), l.to_string()));
                }
            }
            "--log-format" => o.log_format = Some(value),
            "--log-path" => o.log_path = Some(value),
            "--drain-time-s" => o.drain_time_s = parse_u32(&flag, &value)?,
            "--drain-strategy" => {
                o.drain_strategy = match value.as_str() {
                    "gradual" => DrainStrategy::Gradual,
                    "immediate" => DrainStrategy::Immediate,
                    _ => return Err(CliError::BadValue { flag, value }),
                }
            }
            "--parent-shutdown-time-s" => o.parent_shutdown_time_s = parse_u32(&flag, &value)?,
            "--local-address-ip-version" => {
                o.local_address_ip_version = match value.as_str() {
                    "v4" => IpVersion::V4,
                    "v6" => IpVersion::V6,
                    _ => return Err(CliError::BadValue { flag, value }),
                }
            }
            "--file-flush-interval-msec" => o.file_flush_interval_msec = parse_u32(&flag, &value)?,
            "--service-cluster" => o.service_cluster = Some(value),
            "--service-node" => o.service_node = Some(value),
            "--service-zone" => o.service_zone = Some(value),
            "--base-id" => o.base_id = parse_u32(&flag, &value)?,
            "--restart-epoch" => {
                // Epoch 0 is a first start, which is all Petrel does; a later epoch asks for a hot
                // restart.
                if parse_u32(&flag, &value)? != 0 {
                    return Err(CliError::Unsupported {
                        flag,
                        value,
                        why: "Petrel has no hot restart",
                    });
                }
            }
            "-a" | "--admin-address-path" => o.admin_address_path = Some(value),
            _ => {
                let why = REFUSED_VALUED
                    .iter()
                    .find(|(n, _)| *n == flag)
                    .map(|(_, w)| *w)
                    .unwrap_or("not implemented");
                return Err(CliError::Unsupported { flag, value, why });
            }
        }
    }
    Ok(Command::Run(Box::new(o)))
}

/// `--help` text: the flags Petrel honours.
pub const USAGE: &str =
    "USAGE: petrel -c <path> [--config-yaml <yaml>] [--mode serve|validate|init_only]
  [--concurrency <n>] [-l|--log-level <level>] [--component-log-level <c:l,...>]
  [--log-format <fmt>] [--log-path <path>] [--drain-time-s <s>] [--drain-strategy gradual|immediate]
  [--parent-shutdown-time-s <s>] [--local-address-ip-version v4|v6]
  [--file-flush-interval-msec <ms>] [--allow-unknown-static-fields]
  [--reject-unknown-dynamic-fields] [--ignore-unknown-dynamic-fields]
  [--service-cluster <s>] [--service-node <s>] [--service-zone <s>] [--base-id <n>]
  [--admin-address-path <path>] [--disable-hot-restart] [--version] [-h|--help]";

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Serve => "Serve",
            Mode::Validate => "Validate",
            Mode::InitOnly => "InitOnly",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Options, CliError> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Command::Run(o) => Ok(*o),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pilot_agent_command_line() {
        let o = run(&[
            "-c",
            "etc/istio/proxy/envoy-rev.json",
            "--drain-time-s",
            "45",
            "--drain-strategy",
            "immediate",
            "--local-address-ip-version",
            "v4",
            "--file-flush-interval-msec",
            "1000",
            "--disable-hot-restart",
            "--allow-unknown-static-fields",
            "--log-format",
            "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t",
            "-l",
            "warning",
            "--component-log-level",
            "misc:error",
            "--concurrency",
            "2",
        ])
        .unwrap();
        assert_eq!(
            o.config_path.as_deref(),
            Some("etc/istio/proxy/envoy-rev.json")
        );
        assert_eq!(o.drain_time_s, 45);
        assert_eq!(o.drain_strategy, DrainStrategy::Immediate);
        assert_eq!(o.file_flush_interval_msec, 1000);
        assert!(o.allow_unknown_static_fields);
        assert_eq!(o.log_level, "warning");
        assert_eq!(o.component_log_level, vec![("misc".into(), "error".into())]);
        assert_eq!(o.concurrency, 2);
    }

    #[test]
    fn equals_form_and_modes() {
        let o = run(&["--config-path=x.yaml", "--mode=validate", "--base-id=3"]).unwrap();
        assert_eq!(o.mode, Mode::Validate);
        assert_eq!(o.base_id, 3);
        assert_eq!(o.config_path.as_deref(), Some("x.yaml"));
    }

    #[test]
    fn errors_match_envoy_wording() {
        assert_eq!(
            run(&["--bogus"]).unwrap_err().to_string(),
            "PARSE ERROR: Argument: --bogus\n             Couldn't find match for argument"
        );
        assert_eq!(
            run(&["--concurrency", "abc"]).unwrap_err().to_string(),
            "PARSE ERROR: Argument: (--concurrency)\n             Couldn't read argument value from string 'abc'"
        );
        assert!(matches!(run(&["-c"]), Err(CliError::MissingValue(_))));
        assert!(matches!(
            run(&["--mode", "x"]),
            Err(CliError::BadValue { .. })
        ));
        assert!(matches!(
            run(&["--restart-epoch", "1"]),
            Err(CliError::Unsupported { .. })
        ));
        assert!(matches!(
            run(&["--stats-tag", "a:b"]),
            Err(CliError::Unsupported { .. })
        ));
        assert!(matches!(
            run(&["-l", "loud"]),
            Err(CliError::BadValue { .. })
        ));
    }

    #[test]
    fn version_and_help() {
        assert_eq!(parse(["--version".to_string()]).unwrap(), Command::Version);
        assert_eq!(parse(["-h".to_string()]).unwrap(), Command::Help);
    }
}
