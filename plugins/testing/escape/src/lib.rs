//! Tries to leave the sandbox and reports, for each attempt, what it saw:
//! `{"read_file", "list_dir", "env_vars", "home", "tcp_connect", "dns"}`.
//! Each value is either what was obtained or `"denied: <error>"`.

use std::net::{TcpStream, ToSocketAddrs};

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase, json};

struct Escape;

fn outcome<T: std::fmt::Debug, E: std::fmt::Display>(result: Result<T, E>) -> String {
    match result {
        Ok(value) => format!("allowed: {value:?}"),
        Err(e) => format!("denied: {e}"),
    }
}

impl Phase for Escape {
    fn run(_: &Context, _: &Input) -> Result<Value, PhaseError> {
        let read_file = outcome(std::fs::read_to_string("/etc/passwd"));
        let list_dir = outcome(std::fs::read_dir(".").map(|d| d.count()));
        let env_vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
        let home = outcome(std::env::var("HOME"));
        let tcp_connect = outcome(TcpStream::connect("127.0.0.1:80").map(|_| "connected"));
        let dns = outcome(("localhost", 80).to_socket_addrs().map(|a| a.count()));
        Ok(json!({
            "read_file": read_file,
            "list_dir": list_dir,
            "env_vars": env_vars,
            "home": home,
            "tcp_connect": tcp_connect,
            "dns": dns,
        }))
    }
}

export_phase!(Escape);
