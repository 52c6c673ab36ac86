//! docker-compose.yml and the Dockerfile stay valid and in step with the project.
//!
//! No Docker engine runs where the tests do, but Debian's `docker-compose` (v1.29)
//! validates and resolves a compose file without one (`docker-compose config`).
//! `scripts/services.sh up` installs it (as root); these tests fail, never skip,
//! when it is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compose_file() -> PathBuf {
    root().join("docker-compose.yml")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Run `docker-compose -f docker-compose.yml ARGS…` in the project dir; returns
/// (success, stdout, stderr). Panics with install instructions when it is missing.
fn docker_compose(args: &[&str]) -> (bool, String, String) {
    let file = compose_file();
    let out = Command::new("docker-compose")
        .arg("-f")
        .arg(&file)
        .args(args)
        .current_dir(root())
        // A caller's COMPOSE_* settings must not change which files are read.
        .env_remove("COMPOSE_FILE")
        .env_remove("COMPOSE_PATH_SEPARATOR")
        .env_remove("COMPOSE_PROJECT_NAME")
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "the docker-compose command is not installed, so docker-compose.yml cannot be \
             validated. Install it: run `scripts/services.sh up` as root (it installs Debian's \
             docker-compose package), or `apt-get install -y docker-compose`"
        ),
        Err(e) => panic!("cannot run docker-compose: {e}"),
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The resolved file (`docker-compose config`), split into one text block per
/// service: (name, the lines under it). Plain text, to need no YAML parser.
fn resolved_services() -> (String, Vec<(String, String)>) {
    let (ok, yaml, err) = docker_compose(&["config"]);
    assert!(ok, "docker-compose config failed:\n{err}");
    let mut services: Vec<(String, String)> = Vec::new();
    let mut in_services = false;
    for line in yaml.lines() {
        if !line.starts_with(' ') {
            in_services = line == "services:";
            continue;
        }
        if !in_services {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent == 2 && line.trim_end().ends_with(':') {
            let name = line.trim().trim_end_matches(':').to_string();
            services.push((name, String::new()));
        } else if let Some((_, body)) = services.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    (yaml, services)
}

fn service<'a>(services: &'a [(String, String)], name: &str, yaml: &str) -> &'a str {
    services
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, body)| body.as_str())
        .unwrap_or_else(|| panic!("docker-compose.yml has no service `{name}`; resolved:\n{yaml}"))
}

#[test]
fn compose_file_is_valid() {
    let (ok, out, err) = docker_compose(&["config", "-q"]);
    assert!(
        ok,
        "`docker-compose -f {} config -q` rejected the file:\n{err}{out}",
        compose_file().display()
    );
}

#[test]
fn compose_file_runs_the_pipeline() {
    let (yaml, services) = resolved_services();
    let names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    for name in ["ehr", "hospital", "kafka", "pgferry", "generator"] {
        assert!(
            names.contains(&name),
            "service `{name}` is missing; services: {names:?}"
        );
    }

    // Both PostgreSQL servers decode logical replication (pgferry reads the EHR;
    // the hospital keeps the same setting, as scripts/services.sh does).
    assert_eq!(
        yaml.matches("wal_level=logical").count(),
        2,
        "wal_level=logical should be set on ehr and hospital:\n{yaml}"
    );
    for (name, port) in [("ehr", "5433"), ("hospital", "5434")] {
        let body = service(&services, name, &yaml);
        assert!(
            body.contains("wal_level=logical"),
            "{name}: no wal_level=logical:\n{body}"
        );
        assert!(
            body.contains("image: postgres:"),
            "{name}: not a postgres image:\n{body}"
        );
        assert!(
            body.contains(&format!("published: {port}")),
            "{name}: should publish port {port}, like scripts/services.sh:\n{body}"
        );
    }

    // Every SQL file mounted into an init dir exists in the repository.
    let mut mounted = 0;
    for line in yaml.lines() {
        let line = line.trim().trim_start_matches("- ");
        if let Some((host, _)) = line.split_once(":/docker-entrypoint-initdb.d/") {
            assert!(
                Path::new(host).is_file(),
                "docker-compose.yml mounts {host}, which does not exist"
            );
            mounted += 1;
        }
    }
    assert_eq!(
        mounted, 3,
        "expected ehr_schema, source_setup and hospital_schema mounted:\n{yaml}"
    );

    // Kafka runs in KRaft mode: the one node is its own controller.
    let kafka = service(&services, "kafka", &yaml);
    let roles = kafka
        .lines()
        .find_map(|l| l.trim().strip_prefix("KAFKA_PROCESS_ROLES:"))
        .unwrap_or_else(|| panic!("kafka: no KAFKA_PROCESS_ROLES (KRaft):\n{kafka}"));
    assert!(
        roles.contains("controller") && roles.contains("broker"),
        "kafka roles: {roles}"
    );
    assert!(
        !kafka.contains("ZOOKEEPER"),
        "kafka should not need ZooKeeper:\n{kafka}"
    );

    // pgferry is built from this repository's Dockerfile; the generator runs that image.
    let pgferry = service(&services, "pgferry", &yaml);
    assert!(
        pgferry.contains(&format!("context: {}", root().display()))
            && pgferry.contains("dockerfile: Dockerfile"),
        "pgferry should be built from {}/Dockerfile:\n{pgferry}",
        root().display()
    );
    let image = pgferry
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .unwrap_or_else(|| {
            panic!("pgferry: the built image needs a name for the generator:\n{pgferry}")
        });
    let generator = service(&services, "generator", &yaml);
    assert!(
        generator.contains(&format!("image: {image}")),
        "generator should run pgferry's image {image}:\n{generator}"
    );
    assert!(generator.contains("- generate"), "generator: {generator}");
    for dep in ["ehr", "hospital", "kafka"] {
        assert!(
            pgferry.contains(&format!("    {dep}:\n        condition: service_healthy")),
            "pgferry should wait for {dep} to be healthy:\n{pgferry}"
        );
    }
    assert!(
        pgferry.contains("published: 9187"),
        "pgferry: metrics port:\n{pgferry}"
    );
}

/// Every PGFERRY_* variable the compose file gives pgferry must be read by the
/// configuration baked into the image, or setting it does nothing.
#[test]
fn compose_environment_is_read_by_the_config() {
    let (yaml, services) = resolved_services();
    let pgferry = service(&services, "pgferry", &yaml);
    let config_path = root().join("config/pgferry.toml");
    let config = read(&config_path);
    let vars: Vec<&str> = pgferry
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("PGFERRY_"))
        .collect();
    for var in [
        "PGFERRY_SOURCE_URL",
        "PGFERRY_TARGET_URL",
        "PGFERRY_BROKERS",
    ] {
        assert!(
            vars.contains(&var),
            "pgferry's environment lacks {var}:\n{pgferry}"
        );
    }
    for var in vars {
        assert!(
            config.contains(&format!("${{{var}")),
            "docker-compose.yml sets {var} for pgferry, but {} never reads it \
             (it should say e.g. \"${{{var}:-<default>}}\")",
            config_path.display()
        );
    }
}

#[test]
fn dockerfile_is_multi_stage_slim_and_unprivileged() {
    let path = root().join("Dockerfile");
    let text = read(&path);
    // Instructions only (comments and continuation lines dropped).
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let upper = |l: &str| {
        l.split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase()
    };

    let froms: Vec<&str> = instructions
        .iter()
        .copied()
        .filter(|l| upper(l) == "FROM")
        .collect();
    assert_eq!(
        froms.len(),
        2,
        "a build stage and a runtime stage: {froms:?}"
    );
    assert!(froms[0].contains("rust:"), "build stage: {}", froms[0]);
    assert!(
        froms[0].to_ascii_lowercase().contains(" as build"),
        "build stage is named: {}",
        froms[0]
    );
    assert!(
        froms[1].contains("slim"),
        "runtime stage should be slim: {}",
        froms[1]
    );

    // The last USER (the one the container runs as) is a named, non-root user.
    let user = instructions
        .iter()
        .rev()
        .find(|l| upper(l) == "USER")
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("{}: no USER, so the container runs as root", path.display()));
    let name = user.split(':').next().unwrap_or(user);
    assert!(
        name != "root" && name != "0",
        "{}: USER {user} is root",
        path.display()
    );
    // ...and it comes after the runtime FROM.
    let runtime_at = text.rfind(froms[1]).unwrap();
    let user_at = text.rfind(&format!("USER {user}")).unwrap();
    assert!(
        user_at > runtime_at,
        "USER must be set in the runtime stage"
    );

    assert!(
        text.contains("COPY --from=build /src/target/release/pgferry /usr/local/bin/pgferry"),
        "runtime stage should copy the release binary from the build stage"
    );
    assert!(
        text.contains("cargo build --release --locked"),
        "build with the lock file"
    );
    assert!(
        text.contains(r#"ENTRYPOINT ["pgferry"]"#),
        "entrypoint is the binary"
    );
    assert!(text.contains("EXPOSE 9187"), "metrics port");

    // The dependency layer builds against a stub of each target Cargo.toml names,
    // or cargo cannot read the manifest: a new [[bench]] needs a stub here too.
    let manifest = read(&root().join("Cargo.toml"));
    let mut in_bench = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bench = line == "[[bench]]";
        } else if in_bench {
            if let Some(name) = line.strip_prefix("name = ") {
                let stub = format!("benches/{}.rs", name.trim_matches('"'));
                assert!(
                    text.contains(&stub),
                    "Cargo.toml declares the bench {name}; the Dockerfile's dependency layer needs a stub {stub}"
                );
            }
        }
    }

    // The build context leaves out target/ (gigabytes) but keeps what the build copies.
    let ignore = read(&root().join(".dockerignore"));
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        ignored.contains(&"target/"),
        ".dockerignore should exclude target/: {ignored:?}"
    );
    for needed in [
        "src",
        "src/",
        "benches",
        "benches/",
        "config",
        "config/",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        assert!(
            !ignored.contains(&needed),
            ".dockerignore excludes {needed}, which the build needs"
        );
    }
}
