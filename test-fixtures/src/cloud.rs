//! A distributed cloud for tests: bridge instances and a projector on the
//! services the environment names ([`Services`]), in a namespace of their
//! own, and edge nodes that sync with them.

use std::path::PathBuf;

use crate::process::{BRIDGE, PROJECTOR, ServiceProcess, edge_config_on, named_bridge_config, projector_config};
use crate::services::{Services, namespace};
use crate::{TestIssuer, free_port};

#[derive(Debug)]
pub struct Cloud {
    pub issuer: TestIssuer,
    pub services: Services,
    pub namespace: String,
    pub bridges: Vec<ServiceProcess>,
    pub projector: ServiceProcess,
    partitions: u32,
    dir: tempfile::TempDir,
}

impl Cloud {
    /// Starts `bridges` bridge instances and a projector on a change topic
    /// of `partitions` partitions.
    pub fn start(test: &str, bridges: usize, partitions: u32) -> Self {
        let issuer = TestIssuer::new("key-1");
        let services = Services::from_env();
        let namespace = namespace(test);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut cloud = Cloud {
            projector: ServiceProcess::launch(
                PROJECTOR,
                &dir.path().join("projector"),
                &issuer.jwks(),
                &projector_config(
                    "projector-1",
                    "127.0.0.1:0",
                    &services.sections(&namespace, partitions, &format!("{namespace}-projector")),
                ),
            ),
            issuer,
            services,
            namespace,
            bridges: Vec::new(),
            partitions,
            dir,
        };
        for index in 0..bridges {
            let bridge = cloud.start_bridge(index, free_port());
            cloud.bridges.push(bridge);
        }
        cloud
    }

    fn start_bridge(&self, index: usize, port: u16) -> ServiceProcess {
        let data_dir = self.dir.path().join(format!("bridge-{index}"));
        let config = named_bridge_config(
            &format!("bridge-{index}"),
            &data_dir,
            &format!("127.0.0.1:{port}"),
            "",
            &self.sections(),
        );
        ServiceProcess::launch(BRIDGE, &data_dir, &self.issuer.jwks(), &config)
    }

    /// Another projector in the same consumer group, or (`group`) in
    /// another, which reads the topic from its first offset.
    pub fn start_projector(&self, name: &str, group: Option<&str>) -> ServiceProcess {
        let data_dir = self.dir.path().join(name);
        let group = group.map_or_else(|| format!("{}-projector", self.namespace), str::to_owned);
        let sections = self.services.sections(&self.namespace, self.partitions, &group);
        let config = projector_config(name, "127.0.0.1:0", &sections);
        ServiceProcess::launch(PROJECTOR, &data_dir, &self.issuer.jwks(), &config)
    }

    fn sections(&self) -> String {
        self.services.sections(&self.namespace, self.partitions, &format!("{}-projector", self.namespace))
    }

    /// An edge node of `ward` that syncs with bridge `bridge`.
    pub fn edge(&self, node: &str, ward: &str, bridge: usize) -> ServiceProcess {
        let data_dir = self.edge_dir(node);
        std::fs::create_dir_all(&data_dir).expect("create the edge's directory");
        std::fs::write(data_dir.join("node-token"), self.issuer.token(node, &["edge-node"], &[ward]))
            .expect("write the node token");
        let sync = format!(
            "[sync]\nbridge_url = \"ws://{}/sync\"\nreconnect_base_ms = 100\nreconnect_cap_ms = 1000\n",
            self.bridges[bridge].addr
        );
        let config = edge_config_on(&data_dir, node, ward, "127.0.0.1:0", &sync);
        ServiceProcess::launch(crate::process::EDGE_NODE, &data_dir, &self.issuer.jwks(), &config)
    }

    fn edge_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    pub fn pharmacist(&self) -> String {
        self.issuer.token("p.lindqvist", &["pharmacist"], &[])
    }

    /// The namespace's MongoDB database, for checks behind the API.
    pub async fn database(&self) -> mongodb::Database {
        let client = mongodb::Client::with_uri_str(&self.services.mongodb_uri).await.expect("a mongodb client");
        client.database(&self.namespace)
    }

    /// A value of the projector's (or bridge's) Prometheus metrics, summed over its labels.
    pub async fn metric(process: &ServiceProcess, name: &str) -> Option<f64> {
        let text = reqwest::get(process.url("/metrics")).await.ok()?.text().await.ok()?;
        let values: Vec<f64> = text
            .lines()
            .filter(|line| line.split([' ', '{']).next() == Some(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }
}

impl Drop for Cloud {
    /// Drops the namespace's database, so test runs do not pile up data in
    /// the shared MongoDB (best effort: a failure here fails no test).
    fn drop(&mut self) {
        for process in self.bridges.iter_mut().chain(std::iter::once(&mut self.projector)) {
            process.kill9();
        }
        let (uri, namespace) = (self.services.mongodb_uri.clone(), self.namespace.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let client = mongodb::Client::with_uri_str(&uri).await.ok()?;
                client.database(&namespace).drop().await.ok()
            })
        })
        .join();
    }
}
