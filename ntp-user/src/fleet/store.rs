//! The connection to the fleet's etcd: TLS with a client certificate and/or a user, short
//! timeouts (the store is never waited on by the time path), and typed reads of the keys.

use std::time::Duration;

use anyhow::{Context as _, Result};
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use super::{FleetSpec, HostView, Keys};

/// Requests that take longer fail (and are retried by whoever asked).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// A client of one member that answers: the endpoints are tried in turn from a random one
/// (etcd-client balances over every endpoint it is given and fails requests routed to a dead
/// one, so the agent holds one member at a time and moves on when it fails).
pub async fn connect(spec: &FleetSpec) -> Result<Client> {
    let n = spec.endpoints.len();
    let first = rand::random::<usize>() % n.max(1);
    let mut failures = Vec::new();
    for i in 0..n {
        let endpoint = &spec.endpoints[(first + i) % n];
        match connect_one(spec, endpoint).await {
            Ok(c) => return Ok(c),
            Err(e) => failures.push(format!("{endpoint}: {e:#}")),
        }
    }
    anyhow::bail!("no etcd endpoint answers: {}", failures.join("; "))
}

async fn connect_one(spec: &FleetSpec, endpoint: &str) -> Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if spec.tls() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &spec.ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&spec.certificate, &spec.key) {
            let c = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
            let k = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
            tls = tls.identity(Identity::from_pem(c, k));
        }
        opts = opts.with_tls(tls);
    }
    if let Some(user) = &spec.user {
        let password = match &spec.password_file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim_end()
                .to_string(),
            None => String::new(),
        };
        opts = opts.with_user(user.clone(), password);
    }
    let mut client =
        tokio::time::timeout(REQUEST_TIMEOUT * 2, Client::connect([endpoint], Some(opts)))
            .await
            .context("timed out")?
            .context("connecting")?;
    // A member cut off from the others' quorum fails a linearizable read: try the next.
    tokio::time::timeout(REQUEST_TIMEOUT, client.get("/ntp-xdp/", None))
        .await
        .context("timed out")?
        .context("a read")?;
    Ok(client)
}

/// A key's value and mod revision, if it exists.
pub async fn get(client: &mut Client, key: &str) -> Result<Option<(String, i64)>> {
    let resp = client
        .get(key, None)
        .await
        .with_context(|| format!("reading {key}"))?;
    Ok(resp.kvs().first().map(|kv| {
        (
            String::from_utf8_lossy(kv.value()).into_owned(),
            kv.mod_revision(),
        )
    }))
}

/// The value `key` had at store revision `revision` (the config a rollout pinned).
pub async fn get_at(client: &mut Client, key: &str, revision: i64) -> Result<Option<String>> {
    let resp = client
        .get(key, Some(GetOptions::new().with_revision(revision)))
        .await
        .with_context(|| format!("reading {key} at revision {revision}"))?;
    Ok(resp
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

/// Every host the store knows of (by any of its keys), with what it says about each.
pub async fn hosts(client: &mut Client, keys: &Keys) -> Result<Vec<HostView>> {
    hosts_under(client, keys, &keys.hosts()).await
}

/// The hosts with keys under `prefix` (all of them, or one: `hosts/<h>/`).
pub async fn hosts_under(client: &mut Client, keys: &Keys, prefix: &str) -> Result<Vec<HostView>> {
    use std::collections::BTreeMap;
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .context("reading the hosts")?;
    let mut out: BTreeMap<String, HostView> = BTreeMap::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let Some((host, part)) = keys.split_host_key(&key) else {
            continue;
        };
        let v = out.entry(host.to_string()).or_insert_with(|| HostView {
            host: host.to_string(),
            ..Default::default()
        });
        let value = kv.value();
        match part {
            super::STATUS => v.status = serde_json::from_slice(value).ok(),
            super::CONFIG_STATE => v.config_state = serde_json::from_slice(value).ok(),
            super::COMMAND_STATE => v.command_state = serde_json::from_slice(value).ok(),
            super::DESIRED => {
                v.desired = serde_json::from_slice::<super::Desired>(value)
                    .ok()
                    .map(|d| d.revision)
            }
            _ => {}
        }
    }
    Ok(out.into_values().collect())
}
