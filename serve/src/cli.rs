//! Flags and environment variables as both binaries take them: the clap
//! definitions are the defaults, every flag also reads an environment
//! variable named after it under the binary's prefix (`WSET_AGENT_`,
//! `WSET_CONTROLLER_`), durations have one syntax (`250ms`, `10s`, `5m`,
//! `1h`, `1d`, and `us` for microseconds), and the spellings of the
//! previous release still work for one more, each with a warning naming
//! its replacement.

use std::ffi::{OsStr, OsString};
use std::ops::{Bound, RangeBounds};
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::error::ErrorKind;

/// Units of the duration syntax, largest first, in microseconds.
const UNITS: [(&str, u64); 6] = [
    ("d", 86_400_000_000),
    ("h", 3_600_000_000),
    ("m", 60_000_000),
    ("s", 1_000_000),
    ("ms", 1_000),
    ("us", 1),
];

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} has no unit: write e.g. {0}ms or {0}s (units: us, ms, s, m, h, d)")]
    NoUnit(String),
    #[error("{0:?}: expected a whole number and a unit, e.g. 250ms, 10s, 5m, 1h, 1d")]
    Malformed(String),
    #[error("{value:?}: unknown unit {unit:?} (units: us, ms, s, m, h, d)")]
    UnknownUnit { value: String, unit: String },
    #[error("{0:?} is too long")]
    TooLong(String),
}

/// Parse a duration: a whole number and a unit, `us`, `ms`, `s`, `m`, `h`
/// or `d` (`250ms`, `10s`, `5m`, `1h`, `1d`); `0` needs none.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| DurationError::Malformed(s.to_owned()))?;
    let unit = match unit {
        "" if n == 0 => return Ok(Duration::ZERO),
        "" => return Err(DurationError::NoUnit(s.to_owned())),
        "µs" => "us",
        u => u,
    };
    let per = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|&(_, per)| per)
        .ok_or_else(|| DurationError::UnknownUnit {
            value: s.to_owned(),
            unit: unit.to_owned(),
        })?;
    n.checked_mul(per)
        .map(Duration::from_micros)
        .ok_or_else(|| DurationError::TooLong(s.to_owned()))
}

/// `d` in the syntax [`parse_duration`] reads, in the largest unit that
/// holds it whole (`90s`, `5m`, `200us`; below a microsecond is dropped).
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us == 0 {
        return "0s".into();
    }
    let (unit, per) = UNITS
        .iter()
        .find(|(_, per)| us.is_multiple_of(u128::from(*per)))
        .copied()
        .unwrap_or(("us", 1));
    format!("{}{unit}", us / u128::from(per))
}

/// A clap value parser of durations within bounds, optionally whole
/// milliseconds (for settings kept in milliseconds). Refusals name the flag
/// (clap adds it) and the allowed range.
#[derive(Clone, Copy, Debug)]
pub struct DurationParser {
    min: Duration,
    max: Duration,
    whole_millis: bool,
}

/// Any duration; narrow it with [`DurationParser::at_least`],
/// [`DurationParser::at_most`] and [`DurationParser::whole_millis`].
pub const fn duration() -> DurationParser {
    DurationParser {
        min: Duration::ZERO,
        max: Duration::MAX,
        whole_millis: false,
    }
}

impl DurationParser {
    pub const fn at_least(mut self, min: Duration) -> Self {
        self.min = min;
        self
    }

    pub const fn at_most(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// Refuse parts of a millisecond.
    pub const fn whole_millis(mut self) -> Self {
        self.whole_millis = true;
        self
    }

    /// Parse `s` and check it against the bounds.
    pub fn check(&self, s: &str) -> Result<Duration, String> {
        let d = parse_duration(s).map_err(|e| e.to_string())?;
        let range = match (self.min.is_zero(), self.max == Duration::MAX) {
            (_, true) => format!("at least {}", format_duration(self.min)),
            (true, false) => format!("at most {}", format_duration(self.max)),
            (false, false) => format!(
                "between {} and {}",
                format_duration(self.min),
                format_duration(self.max)
            ),
        };
        if d < self.min || d > self.max {
            return Err(format!("{s} is out of range: {range}"));
        }
        if self.whole_millis && !d.subsec_nanos().is_multiple_of(1_000_000) {
            return Err(format!("{s}: give whole milliseconds"));
        }
        Ok(d)
    }
}

impl TypedValueParser for DurationParser {
    type Value = Duration;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<Duration, clap::Error> {
        let me = *self;
        (move |s: &str| me.check(s)).parse_ref(cmd, arg, value)
    }
}

/// A clap value parser of numbers within `range`, e.g.
/// `(Bound::Excluded(0.0), Bound::Excluded(0.5))`.
#[derive(Clone, Copy, Debug)]
pub struct F64Parser {
    lo: Bound<f64>,
    hi: Bound<f64>,
}

pub fn f64_in(range: impl RangeBounds<f64>) -> F64Parser {
    F64Parser {
        lo: range.start_bound().cloned(),
        hi: range.end_bound().cloned(),
    }
}

impl F64Parser {
    pub fn check(&self, s: &str) -> Result<f64, String> {
        let v: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number"))?;
        if (self.lo, self.hi).contains(&v) {
            return Ok(v);
        }
        let lo = match self.lo {
            Bound::Included(x) => Some(format!("at least {x}")),
            Bound::Excluded(x) => Some(format!("above {x}")),
            Bound::Unbounded => None,
        };
        let hi = match self.hi {
            Bound::Included(x) => Some(format!("at most {x}")),
            Bound::Excluded(x) => Some(format!("below {x}")),
            Bound::Unbounded => None,
        };
        let range: Vec<String> = [lo, hi].into_iter().flatten().collect();
        Err(format!("{s} is out of range: {}", range.join(" and ")))
    }
}

impl TypedValueParser for F64Parser {
    type Value = f64;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<f64, clap::Error> {
        let me = *self;
        (move |s: &str| me.check(s)).parse_ref(cmd, arg, value)
    }
}

/// A value refused by a check across flags (each value alone is checked as
/// it is parsed): `flag` is the flag to change, `problem` what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag}: {problem}")]
pub struct FlagError {
    pub flag: String,
    pub problem: String,
}

impl FlagError {
    pub fn new(flag: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            flag: flag.into(),
            problem: problem.into(),
        }
    }
}

/// A spelling of the previous release, accepted with a warning for one more.
#[derive(Clone, Copy, Debug)]
pub struct Legacy {
    /// The flag's long name now.
    pub flag: &'static str,
    /// Its long name before and the unit its bare numbers were in, when
    /// that changed.
    pub old_flag: Option<(&'static str, &'static str)>,
    /// Its environment variable before.
    pub old_env: Option<&'static str>,
}

impl Legacy {
    /// `flag` read `old_env` before.
    pub const fn env(flag: &'static str, old_env: &'static str) -> Self {
        Self {
            flag,
            old_flag: None,
            old_env: Some(old_env),
        }
    }

    /// `flag` was `old_flag`, whose values were whole numbers of `unit`
    /// (comma-separated for a list).
    pub const fn renamed(flag: &'static str, old_flag: &'static str, unit: &'static str) -> Self {
        Self {
            flag,
            old_flag: Some((old_flag, unit)),
            old_env: None,
        }
    }

    /// ... and its environment variable was `old_env`.
    pub const fn was_env(mut self, old_env: &'static str) -> Self {
        self.old_env = Some(old_env);
        self
    }
}

/// Spellings of the previous release that both binaries shared: the
/// transport flags ([`crate::SecurityArgs`]), `--metrics-addr` and
/// `--log-json`.
pub const SHARED_LEGACY: &[Legacy] = &[
    Legacy::env("metrics-addr", "WSET_METRICS_ADDR"),
    Legacy::env("log-json", "WSET_LOG_JSON"),
    Legacy::env("tls-cert", "WSET_TLS_CERT"),
    Legacy::env("tls-key", "WSET_TLS_KEY"),
    Legacy::env("tls-client-ca", "WSET_TLS_CLIENT_CA"),
    Legacy::renamed("tls-reload", "tls-reload-secs", "s"),
    Legacy::env("insecure-plaintext", "WSET_INSECURE_PLAINTEXT"),
];

/// A binary's flags: a clap parser that converts into its configuration.
pub trait Flags: clap::Parser {
    /// Prefix of every flag's environment variable, e.g. `WSET_AGENT_`.
    const ENV_PREFIX: &'static str;
    /// This binary's own spellings of the previous release (besides
    /// [`SHARED_LEGACY`]).
    const LEGACY: &'static [Legacy];
    type Config;

    /// Whether to log JSON lines (not part of the configuration `run` takes).
    fn log_json(&self) -> bool;

    /// Check the values against each other and build the configuration.
    fn into_config(self) -> Result<Self::Config, FlagError>;
}

/// What a binary starts with: its configuration, the log format, and the
/// deprecated spellings it was given (to log once logging is up).
#[derive(Debug)]
pub struct Startup<C> {
    pub config: C,
    pub log_json: bool,
    pub deprecated: Vec<String>,
}

impl<C> Startup<C> {
    /// Log a warning for each deprecated spelling.
    pub fn warn_deprecated(&self) {
        for d in &self.deprecated {
            tracing::warn!("{d}");
        }
    }
}

/// The environment variable of flag `long` under `prefix`.
pub fn env_name(prefix: &str, long: &str) -> String {
    format!("{prefix}{}", long.to_ascii_uppercase().replace('-', "_"))
}

fn legacy<F: Flags>() -> impl Iterator<Item = &'static Legacy> {
    SHARED_LEGACY.iter().chain(F::LEGACY)
}

/// The configuration built from the flags' defaults alone, with no
/// environment variable read: what `Config::default()` returns.
pub fn defaults<F: Flags>() -> F::Config {
    let cmd = F::command();
    let name = cmd.get_name().to_owned();
    cmd.try_get_matches_from([name])
        .and_then(|m| F::from_arg_matches(&m))
        .map_err(|e| e.to_string())
        .and_then(|f| f.into_config().map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("the embedded defaults are refused: {e}"))
}

/// Whether `argv` gives flag `long` (`--long VALUE` or `--long=VALUE`).
fn given(argv: &[OsString], long: &str) -> bool {
    let flag = format!("--{long}");
    argv.iter().skip(1).any(|a| {
        a.to_str()
            .is_some_and(|a| a == flag || a.starts_with(&format!("{flag}=")))
    })
}

/// `value`'s comma-separated whole numbers, each with `unit` appended.
fn with_unit(value: &str, unit: &str) -> Option<String> {
    let parts: Option<Vec<String>> = value
        .split(',')
        .map(|p| {
            let p = p.trim();
            (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())).then(|| format!("{p}{unit}"))
        })
        .collect();
    parts.map(|p| p.join(","))
}

/// Replace each old flag spelling in `argv` by the new one with its unit.
fn rewrite_old_flags<F: Flags>(
    cmd: &clap::Command,
    argv: Vec<OsString>,
    deprecated: &mut Vec<String>,
) -> Result<Vec<OsString>, clap::Error> {
    let mut out = Vec::with_capacity(argv.len());
    let mut it = argv.into_iter();
    out.extend(it.next());
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else {
            out.push(a);
            continue;
        };
        if s == "--" {
            out.push(a);
            out.extend(it.by_ref());
            break;
        }
        let old = legacy::<F>().find_map(|l| {
            let (old, unit) = l.old_flag?;
            let value = match s.strip_prefix("--")?.strip_prefix(old)? {
                "" => None,
                rest => Some(rest.strip_prefix('=')?.to_owned()),
            };
            Some((l.flag, old, unit, value))
        });
        let Some((new, old, unit, value)) = old else {
            out.push(a);
            continue;
        };
        let value = match value {
            Some(v) => v,
            None => it
                .next()
                .and_then(|v| v.into_string().ok())
                .ok_or_else(|| {
                    cmd.clone()
                        .error(ErrorKind::InvalidValue, format!("--{old} needs a value"))
                })?,
        };
        let converted = with_unit(&value, unit).ok_or_else(|| {
            cmd.clone().error(
                ErrorKind::ValueValidation,
                format!(
                    "invalid value '{value}' for '--{old}': expected whole numbers of {unit} \
                     (--{old} is deprecated: write --{new} with a unit instead)"
                ),
            )
        })?;
        deprecated.push(format!(
            "--{old} is deprecated and goes away in the next release: write --{new} {converted}"
        ));
        out.push(format!("--{new}={converted}").into());
    }
    Ok(out)
}

/// Parse `argv` (with the program's name first) and the environment into
/// the binary's configuration. Each flag reads `F::ENV_PREFIX` + its name
/// in upper case (`--grpc-addr`: `WSET_AGENT_GRPC_ADDR`); the command line
/// wins over the environment, which wins over the defaults. Old spellings
/// (flags and variables) are taken as their replacements and listed in
/// [`Startup::deprecated`]. Errors (and `--help`, `--version`) are clap's:
/// `exit()` prints them.
pub fn parse<F: Flags>(
    argv: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<Startup<F::Config>, clap::Error> {
    parse_with::<F>(argv, |name| std::env::var_os(name))
}

/// [`parse`], with `var` telling which old and new variables are set (the
/// process environment in production; the values themselves clap reads).
fn parse_with<F: Flags>(
    argv: impl IntoIterator<Item = impl Into<OsString>>,
    var: impl Fn(&str) -> Option<OsString>,
) -> Result<Startup<F::Config>, clap::Error> {
    let (mut cmd, argv, deprecated) =
        prepare::<F>(argv.into_iter().map(Into::into).collect(), &var)?;
    let matches = cmd.try_get_matches_from_mut(argv)?;
    let flags = F::from_arg_matches(&matches).map_err(|e| e.with_cmd(&cmd))?;
    let log_json = flags.log_json();
    let config = flags
        .into_config()
        .map_err(|e| cmd.error(ErrorKind::ValueValidation, e))?;
    Ok(Startup {
        config,
        log_json,
        deprecated,
    })
}

/// The command with each flag's environment variable, `argv` with old
/// spellings replaced, and the deprecations found. An old variable set
/// beside its flag's new one, or beside the flag itself on the command
/// line, is ignored, and the warning names both and says which wins.
fn prepare<F: Flags>(
    argv: Vec<OsString>,
    var: &dyn Fn(&str) -> Option<OsString>,
) -> Result<(clap::Command, Vec<OsString>, Vec<String>), clap::Error> {
    let cmd = F::command();
    let mut deprecated = Vec::new();
    let mut argv = rewrite_old_flags::<F>(&cmd, argv, &mut deprecated)?;
    // Which variable each flag reads: its own, or its old one while only
    // that is set.
    let mut env: Vec<(String, String)> = Vec::new();
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long() {
            env.push((long.to_owned(), env_name(F::ENV_PREFIX, long)));
        }
    }
    for l in legacy::<F>() {
        let (Some(old_env), Some((_, new_env))) =
            (l.old_env, env.iter_mut().find(|(f, _)| f == l.flag))
        else {
            continue;
        };
        let Some(old_value) = var(old_env) else {
            continue;
        };
        if var(new_env).is_some() {
            deprecated.push(format!(
                "{old_env} is deprecated and ignored: {new_env} is set"
            ));
            continue;
        }
        // The command line wins over any variable (old spellings of the
        // flag were rewritten to the new one above).
        if given(&argv, l.flag) {
            deprecated.push(format!(
                "{old_env} is deprecated and ignored: --{} is given",
                l.flag
            ));
            continue;
        }
        match l.old_flag {
            // The value syntax changed: pass it on as the new flag.
            Some((old_flag, unit)) => {
                let old_value = old_value.to_string_lossy();
                let converted = with_unit(&old_value, unit).ok_or_else(|| {
                    cmd.clone().error(
                        ErrorKind::ValueValidation,
                        format!(
                            "invalid value '{old_value}' for {old_env} (--{old_flag}): expected \
                             whole numbers of {unit}"
                        ),
                    )
                })?;
                deprecated.push(format!(
                    "{old_env} is deprecated and goes away in the next release: set \
                     {new_env}={converted}"
                ));
                argv.insert(1, format!("--{}={converted}", l.flag).into());
            }
            None => {
                deprecated.push(format!(
                    "{old_env} is deprecated and goes away in the next release: set {new_env}"
                ));
                *new_env = old_env.to_owned();
            }
        }
    }
    let cmd = cmd.mut_args(|a| {
        let name = a
            .get_long()
            .and_then(|long| env.iter().find(|(f, _)| f == long))
            .map(|(_, e)| e.clone());
        match name {
            Some(e) if a.get_env().is_none() => a.env(e),
            _ => a,
        }
    });
    Ok((cmd, argv, deprecated))
}

/// The long help the binary prints for `--help`, with every flag's
/// environment variable and default.
pub fn long_help<F: Flags>() -> String {
    let (mut cmd, _, _) = prepare::<F>(vec![OsString::new()], &|name| std::env::var_os(name))
        .expect("no argument to refuse");
    cmd.render_long_help().to_string()
}

/// `F`'s arguments after the program's name, as [`parse`] takes them
/// (errors as text), for tests.
pub fn parse_args<F: Flags>(args: &[&str]) -> Result<Startup<F::Config>, String> {
    let name = F::command().get_name().to_owned();
    parse::<F>(std::iter::once(name.as_str()).chain(args.iter().copied()))
        .map_err(|e| e.to_string())
}

/// Whether `a` and `b` print alike (configurations hold types without
/// `PartialEq`; their debug output shows every field): `Err` shows both.
pub fn same<C: std::fmt::Debug>(a: &C, b: &C) -> Result<(), String> {
    let (a, b) = (format!("{a:#?}"), format!("{b:#?}"));
    if a == b {
        Ok(())
    } else {
        Err(format!("{a}\nis not\n{b}"))
    }
}

/// For each binary's tests: its defaults ([`defaults`], what
/// `Config::default()` returns) are what it gets with no flag, no
/// deprecation is reported, and [`lint`] finds nothing.
pub fn check_defaults<F: Flags>() -> Result<(), String>
where
    F::Config: std::fmt::Debug,
{
    let none = parse_args::<F>(&[])?;
    same(&defaults::<F>(), &none.config)?;
    if !none.deprecated.is_empty() {
        return Err(format!("deprecations with no flag: {:?}", none.deprecated));
    }
    let problems = lint::<F>();
    if !problems.is_empty() {
        return Err(format!("flag definitions: {problems:?}"));
    }
    Ok(())
}

/// Problems in `F`'s definitions: a flag without a long name, a legacy
/// spelling of a flag that does not exist, two flags on one variable.
/// Each binary's tests call it.
pub fn lint<F: Flags>() -> Vec<String> {
    let cmd = F::command();
    let mut problems = Vec::new();
    let mut envs = std::collections::BTreeSet::new();
    for a in cmd.get_arguments() {
        match a.get_long() {
            None => problems.push(format!("{} has no long name", a.get_id())),
            Some(l) if !envs.insert(env_name(F::ENV_PREFIX, l)) => {
                problems.push(format!("two flags read {}", env_name(F::ENV_PREFIX, l)))
            }
            Some(_) if a.get_env().is_some() => problems.push(format!(
                "--{} names its own variable: the prefix gives it one",
                a.get_long().unwrap_or_default()
            )),
            Some(_) => {}
        }
    }
    for l in legacy::<F>() {
        if !cmd.get_arguments().any(|a| a.get_long() == Some(l.flag)) {
            problems.push(format!(
                "legacy spelling of --{}, which does not exist",
                l.flag
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_one_syntax() {
        let ok = [
            ("250ms", Duration::from_millis(250)),
            ("10s", Duration::from_secs(10)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("2d", Duration::from_secs(172_800)),
            ("200us", Duration::from_micros(200)),
            ("200µs", Duration::from_micros(200)),
            ("0", Duration::ZERO),
            (" 3s ", Duration::from_secs(3)),
        ];
        for (s, d) in ok {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        assert_eq!(
            parse_duration("250"),
            Err(DurationError::NoUnit("250".into()))
        );
        for bad in ["10x", "s", "", "-1s", "1.5s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(
            parse_duration("999999999999d")
                .unwrap_err()
                .to_string()
                .contains("too long")
        );
    }

    #[test]
    fn durations_print_back_in_the_same_syntax() {
        for s in [
            "250ms", "10s", "5m", "1h", "1d", "200us", "90s", "0s", "1500ms",
        ] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
        assert_eq!(
            format_duration(Duration::from_millis(86_400_000 * 14)),
            "14d"
        );
    }

    #[test]
    fn bounds_are_checked_and_named() {
        let p = duration().at_least(Duration::from_millis(10));
        assert_eq!(p.check("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(
            p.check("5ms").unwrap_err(),
            "5ms is out of range: at least 10ms"
        );
        let p = duration()
            .at_least(Duration::from_secs(1))
            .at_most(Duration::from_secs(60));
        assert_eq!(
            p.check("2m").unwrap_err(),
            "2m is out of range: between 1s and 1m"
        );
        assert_eq!(
            duration().whole_millis().check("1500us").unwrap_err(),
            "1500us: give whole milliseconds"
        );
        let f = f64_in((Bound::Excluded(0.0), Bound::Excluded(0.5)));
        assert_eq!(f.check("0.01"), Ok(0.01));
        assert_eq!(
            f.check("0.5").unwrap_err(),
            "0.5 is out of range: above 0 and below 0.5"
        );
        assert_eq!(
            f64_in(0.0..).check("-1").unwrap_err(),
            "-1 is out of range: at least 0"
        );
        assert!(f.check("x").is_err());
    }

    #[test]
    fn old_values_gain_their_unit() {
        assert_eq!(with_unit("250", "ms").as_deref(), Some("250ms"));
        assert_eq!(
            with_unit("1000,3000", "ms").as_deref(),
            Some("1000ms,3000ms")
        );
        assert_eq!(with_unit("1s", "ms"), None);
        assert_eq!(with_unit("", "ms"), None);
        assert_eq!(
            env_name("WSET_AGENT_", "tls-client-ca"),
            "WSET_AGENT_TLS_CLIENT_CA"
        );
    }

    /// Flags of a small binary for the parsing tests.
    #[derive(Debug, clap::Parser)]
    #[command(name = "t")]
    struct T {
        #[arg(long, default_value = "2s", value_parser = duration().at_least(Duration::from_millis(10)))]
        interval: Duration,
        #[arg(long, value_delimiter = ',', default_value = "10s,1m", value_parser = duration())]
        windows: Vec<Duration>,
        #[command(flatten)]
        security: crate::SecurityArgs,
        #[arg(long, default_value = "127.0.0.1:1", value_parser = crate::metrics::parse_addr)]
        metrics_addr: crate::metrics::Addr,
        #[arg(long)]
        log_json: bool,
        #[arg(long, default_value_t = 1)]
        n: u32,
    }

    impl Flags for T {
        const ENV_PREFIX: &'static str = "WSET_CLI_TEST_";
        const LEGACY: &'static [Legacy] = &[
            Legacy::renamed("interval", "interval-ms", "ms").was_env("WSET_CLI_TEST_OLD_INTERVAL"),
            Legacy::renamed("windows", "windows-ms", "ms"),
        ];
        type Config = (Duration, Vec<Duration>, Duration, u32);
        fn log_json(&self) -> bool {
            self.log_json
        }
        fn into_config(self) -> Result<Self::Config, FlagError> {
            if self.n > 9 {
                return Err(FlagError::new("--n", "at most 9"));
            }
            Ok((
                self.interval,
                self.windows,
                self.security.tls_reload,
                self.n,
            ))
        }
    }

    #[test]
    fn old_spellings_give_the_same_config_and_a_warning() {
        let new = parse::<T>([
            "t",
            "--interval",
            "250ms",
            "--windows=1s,3s",
            "--tls-reload",
            "5s",
        ])
        .unwrap();
        assert!(new.deprecated.is_empty(), "{:?}", new.deprecated);
        let old = parse::<T>([
            "t",
            "--interval-ms",
            "250",
            "--windows-ms=1000,3000",
            "--tls-reload-secs",
            "5",
        ])
        .unwrap();
        assert_eq!(old.config, new.config);
        assert_eq!(
            old.deprecated,
            [
                "--interval-ms is deprecated and goes away in the next release: write --interval 250ms",
                "--windows-ms is deprecated and goes away in the next release: write --windows 1000ms,3000ms",
                "--tls-reload-secs is deprecated and goes away in the next release: write --tls-reload 5s",
            ]
        );
        let e = parse::<T>(["t", "--interval-ms", "1s"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'--interval-ms'") && e.contains("whole numbers of ms"),
            "{e}"
        );
    }

    #[test]
    fn an_old_variable_beside_the_new_spelling_is_ignored_with_a_warning() {
        let env = |set: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                set.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        // Alone, the old variable is taken (in its old unit).
        let old = parse_with::<T>(["t"], env(&[("WSET_CLI_TEST_OLD_INTERVAL", "100")])).unwrap();
        assert_eq!(old.config.0, Duration::from_millis(100));
        assert_eq!(
            old.deprecated,
            [
                "WSET_CLI_TEST_OLD_INTERVAL is deprecated and goes away in the next release: set \
                 WSET_CLI_TEST_INTERVAL=100ms"
            ]
        );
        // Beside the flag, the flag wins and the warning says so.
        let both = parse_with::<T>(
            ["t", "--interval", "250ms"],
            env(&[("WSET_CLI_TEST_OLD_INTERVAL", "100")]),
        )
        .unwrap();
        assert_eq!(both.config.0, Duration::from_millis(250));
        assert_eq!(
            both.deprecated,
            ["WSET_CLI_TEST_OLD_INTERVAL is deprecated and ignored: --interval is given"]
        );
        // The same for a flag spelt the old way, and for a variable whose
        // syntax did not change.
        let both = parse_with::<T>(
            ["t", "--interval-ms", "250", "--metrics-addr", "127.0.0.1:5"],
            env(&[
                ("WSET_CLI_TEST_OLD_INTERVAL", "100"),
                ("WSET_METRICS_ADDR", "127.0.0.1:9"),
            ]),
        )
        .unwrap();
        assert_eq!(both.config.0, Duration::from_millis(250));
        assert_eq!(
            both.deprecated,
            [
                "--interval-ms is deprecated and goes away in the next release: write --interval 250ms",
                "WSET_METRICS_ADDR is deprecated and ignored: --metrics-addr is given",
                "WSET_CLI_TEST_OLD_INTERVAL is deprecated and ignored: --interval is given",
            ]
        );
        // Beside the new variable, the new variable wins.
        let both = parse_with::<T>(
            ["t"],
            env(&[
                ("WSET_CLI_TEST_OLD_INTERVAL", "100"),
                ("WSET_CLI_TEST_INTERVAL", "250ms"),
            ]),
        )
        .unwrap();
        assert_eq!(
            both.deprecated,
            ["WSET_CLI_TEST_OLD_INTERVAL is deprecated and ignored: WSET_CLI_TEST_INTERVAL is set"]
        );
    }

    #[test]
    fn refusals_name_the_flag() {
        let e = parse::<T>(["t", "--interval", "5ms"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--interval") && e.contains("at least 10ms"),
            "{e}"
        );
        let e = parse::<T>(["t", "--interval", "250"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--interval") && e.contains("no unit"), "{e}");
        let e = parse::<T>(["t", "--n", "10"]).unwrap_err().to_string();
        assert!(e.contains("--n: at most 9"), "{e}");
    }

    #[test]
    fn defaults_are_the_flags_defaults() {
        check_defaults::<T>().unwrap();
        assert_eq!(
            defaults::<T>(),
            (
                Duration::from_secs(2),
                vec![Duration::from_secs(10), Duration::from_secs(60)],
                Duration::from_secs(10),
                1
            )
        );
        assert_eq!(lint::<T>(), Vec::<String>::new());
    }

    #[test]
    fn every_flag_reads_a_prefixed_variable() {
        let help = long_help::<T>();
        for v in [
            "WSET_CLI_TEST_INTERVAL",
            "WSET_CLI_TEST_TLS_RELOAD",
            "WSET_CLI_TEST_LOG_JSON",
        ] {
            assert!(help.contains(v), "{help}");
        }
        assert!(
            help.contains("[default: 2s]") && help.contains("[default: 10s]"),
            "{help}"
        );
    }
}
