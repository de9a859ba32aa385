//! `kith demo` flags. The demo needs no configuration: everything it starts lives in a
//! temporary directory and on loopback ports it picks itself.

use std::time::Duration;

use clap::Args;
use identity::TrustDomain;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after this long (e.g. 90s, 5m) and print a summary [default: until Ctrl-C]
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print the final summary as JSON on stdout; the live view then goes to stderr
    #[arg(long)]
    pub json: bool,
    /// Keep the temporary directory (CA database, agent data, every component's log)
    #[arg(long)]
    pub keep: bool,
    /// The demo's trust domain
    #[arg(long, default_value = "demo.kith", value_parser = parse_trust_domain)]
    pub trust_domain: TrustDomain,
}

impl From<DemoArgs> for demo::Options {
    fn from(a: DemoArgs) -> Self {
        Self {
            duration: a.duration,
            json: a.json,
            keep: a.keep,
            trust_domain: a.trust_domain,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (try 90s or 5m)"))?;
    if d < Duration::from_secs(1) {
        return Err("the demo needs at least 1s (rotations need about 35s)".to_owned());
    }
    Ok(d)
}

fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_humane_and_not_zero() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").unwrap_err().contains("90s"));
    }
}
