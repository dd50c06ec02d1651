//! The embedded bus: one replica, no Redis. Publishing is delivering.

use std::sync::Arc;

use crate::delivery::Delivery;
use crate::protocol::Message;

pub struct MemoryBus {
    delivery: Arc<Delivery>,
}

impl MemoryBus {
    pub fn new(delivery: Arc<Delivery>) -> Self {
        Self { delivery }
    }

    pub async fn publish(&self, msg: Message) {
        self.delivery.dispatch(msg).await;
    }
}
