//! The embedded bus: one replica, no Redis. Publishing is delivering.

use std::sync::Arc;

use super::Sink;
use crate::protocol::Message;

pub struct MemoryBus {
    sink: Arc<dyn Sink>,
}

impl MemoryBus {
    pub fn new(sink: Arc<dyn Sink>) -> Self {
        Self { sink }
    }

    pub async fn publish(&self, msg: Message) {
        self.sink.clone().deliver(msg).await;
    }
}
