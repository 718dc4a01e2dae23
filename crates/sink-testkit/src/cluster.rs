//! A 3-node nats-server cluster on loopback (JetStream, routes, server names n1..n3) for tests that
//! kill a stream leader and check that a new one takes over.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;

use crate::server::{
    acquire_permits, find_binary, free_ports, HarnessError, NatsServer, Readiness, ServerOptions,
    ServerVersion,
};

/// Number of nodes in a [`Cluster`].
pub const CLUSTER_SIZE: usize = 3;

/// How long `start` waits for the JetStream meta leader (an R3 stream can be created).
pub const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Stream the harness creates (and deletes) to prove that clustered JetStream works.
const PROBE_STREAM: &str = "JETSINK_HARNESS_PROBE";

/// Three nats-server nodes routed to each other, JetStream on each with its own store.
///
/// Holds three permits of the live-server cap (see [`crate::server`]). Node `i` has server name
/// `n{i+1}`. Dropping the cluster kills every node.
#[derive(Debug)]
pub struct Cluster {
    name: String,
    nodes: Vec<NatsServer>,
}

impl Cluster {
    /// Starts a cluster of `version` with default options; see [`Cluster::start_with`].
    pub async fn start(version: ServerVersion) -> Result<Cluster, HarnessError> {
        Cluster::start_with(ServerOptions::version(version)).await
    }

    /// Starts three nodes with `base` options (auth, TLS for clients, limits; its `extra_config`
    /// comes before the cluster block) and waits until an R3 stream can be created, i.e. the
    /// JetStream meta leader is elected.
    pub async fn start_with(base: ServerOptions) -> Result<Cluster, HarnessError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let binary = find_binary(base.version)?;
        let mut permits = acquire_permits(CLUSTER_SIZE as u32).await;
        let name = format!(
            "jetsink-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ports = free_ports(CLUSTER_SIZE * 2)?;
        let (client_ports, route_ports) = ports.split_at(CLUSTER_SIZE);
        let routes = route_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");

        let mut nodes = Vec::with_capacity(CLUSTER_SIZE);
        for i in 0..CLUSTER_SIZE {
            let permit = permits
                .split(1)
                .expect("three permits were acquired for three nodes");
            let mut opts = base.clone();
            opts.extra_config = format!(
                "{}\nserver_name: \"n{}\"\ncluster {{\n  name: \"{name}\"\n  listen: \
                 \"127.0.0.1:{}\"\n  routes: [{routes}]\n}}\n",
                base.extra_config,
                i + 1,
                route_ports[i]
            );
            nodes.push(NatsServer::prepare(
                opts,
                binary.clone(),
                client_ports[i],
                Readiness::Client,
                permit,
            )?);
        }
        // All processes first: each needs the others for routes and the meta leader election.
        for node in &mut nodes {
            node.spawn()?;
        }
        for node in &mut nodes {
            node.wait_started(crate::server::READY_TIMEOUT).await?;
        }
        let cluster = Cluster { name, nodes };
        cluster.wait_meta_leader(CLUSTER_READY_TIMEOUT).await?;
        Ok(cluster)
    }

    /// The cluster name (unique per cluster in this process).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Client URLs of all nodes, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Node `i` (0-based; its server name is `n{i+1}`).
    ///
    /// # Panics
    /// If `i >= 3`.
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// All nodes, in order.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// Server name of node `i`: `n{i+1}`.
    pub fn server_name(i: usize) -> String {
        format!("n{}", i + 1)
    }

    /// Connects a client that knows every node's URL (it fails over between them).
    pub async fn connect(&self) -> Result<async_nats::Client, HarnessError> {
        let urls = self.urls();
        self.nodes[0]
            .connect_options()
            .connect(urls.clone())
            .await
            .map_err(|e| HarnessError::Connect {
                url: urls.join(","),
                reason: e.to_string(),
            })
    }

    /// SIGKILLs node `i` and waits for it to exit.
    pub async fn kill_node(&mut self, i: usize) -> Result<(), HarnessError> {
        self.check_index(i)?;
        self.nodes[i].kill().await
    }

    /// Restarts node `i` on its ports and store and waits until JetStream answers through it.
    pub async fn restart_node(&mut self, i: usize) -> Result<(), HarnessError> {
        self.check_index(i)?;
        self.nodes[i].restart().await?;
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        let node = &self.nodes[i];
        let mut reason = String::new();
        while Instant::now() < deadline {
            match account_info(node).await {
                Ok(()) => return Ok(()),
                Err(e) => reason = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(HarnessError::JetStream {
            action: format!("reach JetStream through restarted node n{}", i + 1),
            reason,
        })
    }

    /// SIGKILLs every node (a whole-cluster crash) and waits for them to exit.
    pub async fn kill_all(&mut self) -> Result<(), HarnessError> {
        for node in &mut self.nodes {
            node.kill().await?;
        }
        Ok(())
    }

    /// Restarts every node on its ports and store (a process a node already runs is killed first)
    /// and waits until JetStream answers through each of them, i.e. a meta leader is elected.
    /// Nodes come up one after another without waiting for JetStream in between: alone, the first
    /// one has no quorum.
    pub async fn restart_all(&mut self) -> Result<(), HarnessError> {
        for node in &mut self.nodes {
            node.restart().await?;
        }
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        for (i, node) in self.nodes.iter().enumerate() {
            loop {
                let reason = match account_info(node).await {
                    Ok(()) => break,
                    Err(e) => e,
                };
                if Instant::now() >= deadline {
                    return Err(HarnessError::JetStream {
                        action: format!("reach JetStream through n{} after a full restart", i + 1),
                        reason,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Index of the node that leads `stream` now, from stream info's `cluster.leader`.
    pub async fn stream_leader(&self, stream: &str) -> Result<usize, HarnessError> {
        let client = self.connect().await?;
        let js = jetstream::new(client);
        let info = js
            .get_stream(stream)
            .await
            .map_err(|e| HarnessError::JetStream {
                action: format!("look up stream {stream}"),
                reason: e.to_string(),
            })?
            .info()
            .await
            .map_err(|e| HarnessError::JetStream {
                action: format!("read info of stream {stream}"),
                reason: e.to_string(),
            })?
            .clone();
        let leader = info.cluster.and_then(|c| c.leader);
        self.index_of(leader.as_deref())
            .ok_or(HarnessError::NoStreamLeader {
                stream: stream.to_owned(),
                leader,
                waited: Duration::ZERO,
            })
    }

    /// Polls until `stream` has a leader on a running node other than `not`, at most `timeout`.
    /// Use after killing the leader to wait for the new election.
    pub async fn wait_stream_leader(
        &self,
        stream: &str,
        not: Option<usize>,
        timeout: Duration,
    ) -> Result<usize, HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            match self.stream_leader(stream).await {
                Ok(i) if Some(i) != not && self.nodes[i].pid().is_some() => return Ok(i),
                Ok(i) => last = Some(Cluster::server_name(i)),
                Err(HarnessError::NoStreamLeader { leader, .. }) => last = leader,
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::NoStreamLeader {
                    stream: stream.to_owned(),
                    leader: last,
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn index_of(&self, server_name: Option<&str>) -> Option<usize> {
        let name = server_name?;
        (0..self.nodes.len()).find(|&i| Cluster::server_name(i) == name)
    }

    fn check_index(&self, i: usize) -> Result<(), HarnessError> {
        if i < self.nodes.len() {
            Ok(())
        } else {
            Err(HarnessError::NoSuchNode {
                index: i,
                len: self.nodes.len(),
            })
        }
    }

    /// Creates (and deletes) an R3 stream until that works: the meta leader exists and all
    /// three nodes take part.
    async fn wait_meta_leader(&self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        let client = self.connect().await?;
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(2));
        loop {
            let created = js
                .create_stream(jetstream::stream::Config {
                    name: PROBE_STREAM.to_owned(),
                    subjects: vec![format!("{PROBE_STREAM}.>")],
                    num_replicas: CLUSTER_SIZE,
                    ..Default::default()
                })
                .await;
            let reason = match created {
                Ok(_) => {
                    let _ = js.delete_stream(PROBE_STREAM).await;
                    return Ok(());
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::JetStream {
                    action: format!(
                        "create an R3 stream on cluster {} within {timeout:?} (meta leader \
                         election); logs: {}",
                        self.name,
                        self.nodes
                            .iter()
                            .map(|n| n.log_path().display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    reason,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn account_info(node: &NatsServer) -> Result<(), String> {
    let client = node
        .connect_options()
        .connection_timeout(Duration::from_secs(1))
        .connect(node.url())
        .await
        .map_err(|e| e.to_string())?;
    crate::server::jetstream_answers(&client)
        .await
        .map_err(|e| e.to_string())
}
