//! `spoolgate config check` and `config show` (and `dead-letter list` on a directory not made yet), run as the binary an operator runs.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn config_cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(common::bin());
    cmd.args(args);
    // The test runner's own environment must not leak overrides into the config under test.
    for (name, _) in std::env::vars() {
        if name.starts_with("SPOOLGATE_") {
            cmd.env_remove(name);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run spoolgate")
}

fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write_config(dir: &Path, rules: &str) -> std::path::PathBuf {
    let rules_path = dir.join("rules.toml");
    std::fs::write(&rules_path, rules).unwrap();
    let config = dir.join("spoolgate.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n\n[gate]\nrules_path = {:?}\n\n\
             [sinks.audit]\ntype = \"file\"\ndir = {:?}\n",
            dir.join("data"),
            rules_path,
            dir.join("audit-out"),
        ),
    )
    .unwrap();
    config
}

#[test]
fn config_check_passes_a_config_whose_rules_route_to_configured_sinks_and_counts_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[[rule]]\nname = \"a\"\nkeywords = [\"audit\"]\nsink = \"audit\"\n\n\
         [[rule]]\nname = \"b\"\nregex = ['order #\\d+']\ntags = [\"orders\"]\n",
    );
    let out = config_cli(&["config", "check", config.to_str().unwrap()], &[]);
    let text = all_output(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("rules.toml: ok (2 rule(s))"), "{text}");
}

#[test]
fn config_check_fails_on_a_rules_file_the_daemon_would_refuse_naming_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[[rule]]\nname = \"orders\"\nregex = ['order #(\\d+']\n",
    );
    let out = config_cli(&["config", "check", config.to_str().unwrap()], &[]);
    let text = all_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("rule \"orders\" (#1)") && text.contains("invalid regex"),
        "{text}"
    );
}

#[test]
fn config_check_fails_on_a_rule_routing_to_a_sink_the_config_does_not_define() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[[rule]]\nname = \"a\"\nkeywords = [\"audit\"]\nsink = \"audti\"\n",
    );
    let out = config_cli(&["config", "check", config.to_str().unwrap()], &[]);
    let text = all_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("sink \"audti\" is not configured"), "{text}");
}

#[test]
fn the_daemon_refuses_to_start_with_a_rule_routing_to_a_sink_the_config_does_not_define() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[[rule]]\nname = \"a\"\nkeywords = [\"audit\"]\nsink = \"audti\"\n",
    );
    let log = dir.path().join("serve.log");
    let child = Command::new(common::bin())
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // A daemon that wrongly starts would run until killed: wait for an exit, bounded, and
    // kill it if the wait fails.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(child);
    let status = common::wait_for("the daemon to exit", || child.0.try_wait().unwrap());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains("sink \"audti\" is not configured"), "{text}");
}

#[test]
fn config_check_warns_about_an_environment_variable_that_names_no_key_and_still_passes() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "rule = []\n");
    let out = config_cli(
        &["config", "check", config.to_str().unwrap()],
        &[("SPOOLGATE_PORT", "tcp://10.0.0.1:8750")],
    );
    let text = all_output(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("warning: environment variable SPOOLGATE_PORT names no config section"),
        "{text}"
    );
}

#[test]
fn config_show_redacts_tokens_the_hash_key_sink_headers_and_url_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("spoolgate.toml");
    std::fs::write(
        &config,
        "[gate]\npii_hash_key = \"hash-key-not-for-eyes\"\n\n\
         [[ingest.tokens]]\ntoken = \"token-not-for-eyes-0001\"\ntenant = \"acme\"\n\n\
         [sinks.default]\ntype = \"http\"\nurl = \"http://user:password-not-for-eyes@127.0.0.1:9/in\"\n\
         headers = { authorization = \"Bearer header-not-for-eyes\" }\n",
    )
    .unwrap();
    let out = config_cli(
        &["config", "show"],
        &[("SPOOLGATE_CONFIG", config.to_str().unwrap())],
    );
    let text = all_output(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("not-for-eyes"), "{text}");
    assert!(text.contains("tenant = \"acme\""), "{text}");
    assert!(text.contains("http://<redacted>@127.0.0.1:9/in"), "{text}");
}

#[test]
fn a_key_misspelt_in_an_environment_variable_is_refused_naming_the_variable() {
    let scratch = tempfile::tempdir().unwrap();
    let config = write_config(scratch.path(), "");
    let config = config.to_str().unwrap();
    let out = config_cli(
        &["config", "check", config],
        &[("SPOOLGATE_SPOOL__DURABILTY", "interval")],
    );
    let said = all_output(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("SPOOLGATE_SPOOL__DURABILTY") && said.contains("durabilty"),
        "{said}"
    );
    // Without the variable the same file passes.
    assert!(config_cli(&["config", "check", config], &[])
        .status
        .success());
}

#[test]
fn listing_a_dead_letter_directory_the_daemon_has_not_made_yet_finds_no_letters() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("dead-letter");
    let dir = dir.to_str().unwrap();
    let out = config_cli(&["dead-letter", "list", "--json", dir], &[]);
    let said = all_output(&out);
    assert!(out.status.success(), "{said}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert!(said.contains("no such directory"), "{said}");
}
