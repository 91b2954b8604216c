//! Application services: named request handlers that any member or operator can call.
//!
//! A service is how layers above the node runtime (remote GPU actors, the task queue)
//! speak their own protocol without new wire types: a call names the service and a
//! method, carries arguments the service encodes (MessagePack by convention) and
//! optional f32 tensor data, and is answered with the service's result or an error. The
//! node passes each call the caller's verified identity: the member whose node
//! certificate the connection carries, or the operator bound to its certificate.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use crate::tls::Role;

/// Who is calling: a member (node certificate) or an operator (operator certificate),
/// as the connection's certificate proved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// One call to a service.
#[derive(Debug)]
pub struct ServiceRequest {
    /// Who calls.
    pub caller: Caller,
    /// The method.
    pub method: String,
    /// Encoded arguments.
    pub args: Vec<u8>,
    /// Tensor data sent with the call.
    pub payload: Vec<f32>,
}

/// A service's answer.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ServiceResponse {
    /// The encoded result.
    pub data: Vec<u8>,
    /// Tensor data sent back.
    pub payload: Vec<f32>,
}

/// What a service's handler returns: its answer, or an error message for the caller.
pub type ServiceFuture = Pin<Box<dyn Future<Output = Result<ServiceResponse, String>>>>;

/// A named request handler on a node. Calls run on the node's IO thread: a handler that
/// has heavy work to do hands it to an actor (a GPU actor, a thread pool) and awaits it.
pub trait Service: Send + Sync + 'static {
    /// Answers one call.
    fn call(&self, request: ServiceRequest) -> ServiceFuture;
}

/// The services registered on a node.
#[derive(Default)]
pub(crate) struct Services {
    map: RwLock<HashMap<String, Arc<dyn Service>>>,
}

impl Services {
    pub(crate) fn register(&self, name: &str, service: Arc<dyn Service>) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), service);
    }

    pub(crate) fn unregister(&self, name: &str) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// Runs a call to `service`; unknown services are an error for the caller.
    pub(crate) async fn call(&self, service: &str, request: ServiceRequest) -> Result<ServiceResponse, String> {
        let handler = self.map.read().unwrap_or_else(|p| p.into_inner()).get(service).cloned();
        match handler {
            Some(h) => h.call(request).await,
            None => Err(format!("no service named {service:?} on this node")),
        }
    }
}
