//! The change topic: every change the cloud accepted, keyed by its ticket,
//! so a ticket's changes stay in one partition and in order.
//!
//! The producer is idempotent with `acks=all`: a change is acknowledged to
//! its sender only after every in-sync replica has it, and a retry inside
//! the client never writes it twice. Transactions are not used (not every
//! Kafka-protocol broker has them); consumers are idempotent instead.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::record::ChangeRecord;
use crate::StoreError;
use crate::config::KafkaConfig;

/// How long a metadata or offsets request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the producer lingers to fill a request: batches a burst
/// without adding noticeable latency to a single change.
const LINGER_MS: &str = "5";

/// The client settings every connection to the brokers shares.
pub fn client_config(config: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers).set("client.id", client_id);
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    client
}

/// The bridge's side of the change topic.
pub struct ChangeLog {
    config: KafkaConfig,
    client_id: String,
    /// Rebuilt after a fatal error, which leaves an idempotent producer unusable.
    producer: RwLock<Arc<FutureProducer>>,
}

impl std::fmt::Debug for ChangeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeLog").field("topic", &self.config.topic).finish_non_exhaustive()
    }
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {error}"))
}

impl ChangeLog {
    pub fn new(config: &KafkaConfig, client_id: &str) -> Result<Self, StoreError> {
        let producer = Self::producer(config, client_id)?;
        Ok(Self { config: config.clone(), client_id: client_id.to_owned(), producer: RwLock::new(Arc::new(producer)) })
    }

    fn producer(config: &KafkaConfig, client_id: &str) -> Result<FutureProducer, StoreError> {
        client_config(config, client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", LINGER_MS)
            .set("message.timeout.ms", config.delivery_timeout_ms.to_string())
            .create()
            .map_err(|e| StoreError::Config(format!("cannot configure the kafka producer: {e}")))
    }

    pub fn topic(&self) -> &str {
        &self.config.topic
    }

    pub fn partitions(&self) -> i32 {
        self.config.partitions
    }

    /// Creates the change topic if it is absent, and checks that it has the
    /// configured partition count: a ticket's changes must always land in
    /// the same partition, which another count would break.
    pub async fn ensure_topic(&self) -> Result<(), StoreError> {
        let admin: AdminClient<DefaultClientContext> = client_config(&self.config, &self.client_id)
            .create()
            .map_err(|e| StoreError::Config(format!("cannot configure the kafka admin client: {e}")))?;
        let topic = NewTopic::new(
            &self.config.topic,
            self.config.partitions,
            TopicReplication::Fixed(self.config.replication_factor),
        );
        let options = AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT));
        let results = admin.create_topics([&topic], &options).await.map_err(|e| unavailable("kafka", e))?;
        for result in results {
            match result {
                Ok(name) => tracing::info!(topic = %name, partitions = self.config.partitions, "change topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => return Err(unavailable(&format!("cannot create topic {name}"), code)),
            }
        }
        let found = self.partition_count(&admin).await?;
        if found != self.config.partitions {
            return Err(StoreError::Config(format!(
                "topic {} has {found} partitions, the configuration says {}: a ticket's changes would change \
                 partition; keep kafka.partitions at {found}",
                self.config.topic, self.config.partitions
            )));
        }
        Ok(())
    }

    async fn partition_count(&self, admin: &AdminClient<DefaultClientContext>) -> Result<i32, StoreError> {
        // Metadata may lag a creation for a moment.
        for _ in 0..10 {
            let metadata = admin
                .inner()
                .fetch_metadata(Some(&self.config.topic), METADATA_TIMEOUT)
                .map_err(|e| unavailable("kafka metadata", e))?;
            let count = metadata.topics().first().map_or(0, |t| t.partitions().len());
            if count > 0 {
                return Ok(i32::try_from(count).unwrap_or(i32::MAX));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(StoreError::Unavailable(format!("topic {} has no partitions yet", self.config.topic)))
    }

    /// Appends records in order and waits until the brokers acknowledged
    /// every one. Returns each record's partition and offset, in order.
    pub async fn append(&self, records: &[ChangeRecord]) -> Result<Vec<(i32, i64)>, StoreError> {
        let producer = Arc::clone(&self.producer.read().unwrap_or_else(|p| p.into_inner()));
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let key = record.ticket.to_string();
            let payload = record.encode();
            let future = producer
                .send_result(FutureRecord::to(&self.config.topic).key(&key).payload(&payload))
                .map_err(|(e, _)| self.failed(&producer, e))?;
            deliveries.push(future);
        }
        let mut positions = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(delivery)) => positions.push((delivery.partition, delivery.offset)),
                Ok(Err((error, _))) => return Err(self.failed(&producer, error)),
                Err(_) => return Err(StoreError::Unavailable("kafka producer stopped".into())),
            }
        }
        Ok(positions)
    }

    /// Turns a produce error into a retryable one, and replaces the producer.
    ///
    /// After a failed delivery an idempotent producer cannot know what the
    /// brokers kept; librdkafka would bump its epoch on the next connection,
    /// which not every Kafka-protocol broker implements (tansu 0.6 panics on
    /// it). A fresh producer gets a fresh producer id instead, and its sender
    /// sends the batch again, which the projector deduplicates.
    fn failed(&self, producer: &Arc<FutureProducer>, error: rdkafka::error::KafkaError) -> StoreError {
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::error!(?code, %reason, "kafka producer failed fatally");
        }
        let mut current = self.producer.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&current, producer) {
            match Self::producer(&self.config, &self.client_id) {
                Ok(fresh) => {
                    tracing::warn!(%error, "kafka delivery failed; starting a new producer");
                    *current = Arc::new(fresh);
                }
                Err(error) => tracing::error!(%error, "cannot start a new kafka producer"),
            }
        }
        unavailable("kafka", error)
    }

    /// The next offset of every partition: once the projection reaches
    /// these, it holds everything acknowledged before this call.
    pub async fn end_offsets(&self) -> Result<Vec<i64>, StoreError> {
        let producer = Arc::clone(&self.producer.read().unwrap_or_else(|p| p.into_inner()));
        let (topic, partitions) = (self.config.topic.clone(), self.config.partitions);
        tokio::task::spawn_blocking(move || {
            (0..partitions)
                .map(|p| {
                    producer
                        .client()
                        .fetch_watermarks(&topic, p, METADATA_TIMEOUT)
                        .map(|(_, high)| high)
                        .map_err(|e| unavailable("kafka offsets", e))
                })
                .collect()
        })
        .await
        .map_err(|e| StoreError::Task(format!("offsets: {e}")))?
    }

    /// Whether a broker answers for the topic.
    pub async fn ready(&self) -> Result<(), StoreError> {
        let producer = Arc::clone(&self.producer.read().unwrap_or_else(|p| p.into_inner()));
        let topic = self.config.topic.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
                .map(|_| ())
                .map_err(|_| StoreError::Unavailable("the kafka brokers are not answering".into()))
        })
        .await
        .map_err(|e| StoreError::Task(format!("readiness: {e}")))?
    }

    /// Waits until queued records are delivered (at most `timeout`).
    pub fn flush(&self, timeout: Duration) {
        let producer = Arc::clone(&self.producer.read().unwrap_or_else(|p| p.into_inner()));
        if let Err(error) = producer.flush(timeout) {
            tracing::warn!(%error, "kafka producer did not flush");
        }
    }
}
