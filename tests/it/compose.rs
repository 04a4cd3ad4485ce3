//! Issue 17: `docker compose up` cannot be run here (no Docker engine), so the compose
//! file is checked against the Compose specification's JSON schema (tests/data, from
//! the docker-compose 1.29.2 package on PyPI) with the `jsonschema` validator from PyPI,
//! and for what a user needs from it: a reachable dashboard, a first admin, the topics.

use crate::harness::repo;

#[test]
fn docker_compose_file_is_valid_and_ends_with_a_reachable_dashboard() {
    let python = crate::harness::python();
    let script = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
doc = yaml.safe_load(open(sys.argv[2]))
jsonschema.validate(doc, schema)
s = doc["services"]
tt = s["tokentally"]
env = tt["environment"]
assert env["TOKENTALLY_WEB_LISTEN"] == "0.0.0.0:8080", env
assert "127.0.0.1:8080:8080" in tt["ports"], tt["ports"]
assert env["TOKENTALLY_FIRST_ADMIN"] == "admin"
assert env["TOKENTALLY_FIRST_ADMIN_PASSWORD"] == "${TOKENTALLY_ADMIN_PASSWORD:-}"
assert any(v.endswith(":/var/lib/tokentally") for v in tt["volumes"]), tt["volumes"]
assert env["TOKENTALLY_USERS_FILE"].startswith("/var/lib/tokentally/")
gw = s["gateway"]
assert gw["environment"]["TOKENTALLY_GATEWAY_LISTEN"] == "0.0.0.0:8090"
assert "127.0.0.1:8090:8090" in gw["ports"]
# Several gateways decide limits through the shared store (issue 29).
assert gw["environment"]["TOKENTALLY_GATEWAY_SHARED_LIMITS_REDIS_URL"] == "redis://valkey:6379"
assert gw["depends_on"]["valkey"]["condition"] == "service_healthy"
assert "valkey-server" in s["valkey"]["command"]
init = " ".join(s["kafka-init"]["command"])
assert "--topic " + env["TOKENTALLY_KAFKA_TOPIC"] in init, init
assert "--topic " + env["TOKENTALLY_BILLING_LEDGER_TOPIC"] + " --partitions 1" in init, init
assert "retention.ms=-1" in init
# A file that breaks the specification is refused (the check can fail).
bad = dict(doc)
bad["services"] = dict(s, tokentally=dict(tt, ports="8080"))
try:
    jsonschema.validate(bad, schema)
except jsonschema.ValidationError:
    print("ok")
else:
    sys.exit("an invalid file passed")
"#;
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(repo().join("tests/data/compose_spec.json"))
        .arg(repo().join("docker-compose.yml"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} (scripts/services install-python-sdks): {e}",
                python.display()
            )
        });
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
