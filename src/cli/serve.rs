//! `dspo-server serve` and `dspo-server openapi`: the command-line side of the API, kept in
//! the library so main.rs only dispatches.

use crate::api::ApiBuilder;
use crate::config::{Config, Overrides};
use anyhow::Context;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML file overriding config/default.toml (any subset of its keys)
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:8080 (port 0 picks a free one)
    #[arg(long)]
    pub listen: Option<String>,
    /// NAME=DIR_OR_HUB_ID or NAME=FILE.safetensors[,config=DIR_OR_HUB_ID], repeatable; replaces
    /// models.serve
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// cpu or cuda:N
    #[arg(long)]
    pub device: Option<String>,
    /// f32, f16 or bf16
    #[arg(long)]
    pub dtype: Option<String>,
    /// Where adapters live (<data-dir>/adapters/<name>/adapter.safetensors)
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Any setting of config/default.toml as section.key=value, repeatable
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// Let fine-tuning jobs fetch datasets from loopback/private/link-local addresses
    /// (datasets.allow_private_networks)
    #[arg(long)]
    pub allow_private_dataset_urls: bool,
    /// Listen on a non-loopback address without API keys ([auth] api_keys): anyone who
    /// reaches the port may then start jobs and delete adapters
    #[arg(long)]
    pub insecure_no_auth: bool,
}

impl ServeArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            models: self.models.clone(),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            data_dir: self.data_dir.clone(),
            set: {
                let mut set = self.set.clone();
                if self.allow_private_dataset_urls {
                    set.push("datasets.allow_private_networks=true".into());
                }
                set
            },
        }
    }

    pub fn load_config(&self) -> anyhow::Result<Config> {
        let config = Config::load(self.config.as_deref(), std::env::vars(), &self.overrides())?;
        // Fails here, before anything starts, when no model is named.
        config.model_specs()?;
        let keys = crate::api::auth::KeyRing::from_config(&config.auth)?;
        if !keys.enabled() && !config.server.listens_on_loopback() {
            if !self.insecure_no_auth {
                anyhow::bail!(
                    "refusing to listen on {} without API keys: anyone who reaches it could start \
                     fine-tuning jobs and delete adapters. Configure [auth] api_keys (or \
                     DSPO_AUTH_API_KEYS, or auth.api_keys_file), or pass --insecure-no-auth",
                    config.server.listen
                );
            }
        }
        Ok(config)
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down gracefully"),
        _ = term => tracing::info!("SIGTERM: shutting down gracefully"),
    }
}

/// Serves until a signal, then drains and returns. A model that fails to load stops the
/// server with an error (a server that cannot serve its models should not look healthy).
pub fn run_serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = args.load_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listen = config.server.listen.clone();
        let api = ApiBuilder::new(config).build()?;
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        tracing::info!("listening on http://{}", listener.local_addr()?);
        if !api.auth_enabled() && !api.listens_on_loopback() {
            tracing::warn!("serving without API keys on a non-loopback address (--insecure-no-auth)");
        }
        let load_error = Arc::new(Mutex::new(None::<String>));
        let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<String>();
        let pool = api.pool().clone();
        tokio::spawn(async move {
            match pool.wait_loaded().await {
                Ok(()) => tracing::info!("all models loaded; ready"),
                Err(e) => {
                    let _ = fail_tx.send(e);
                }
            }
        });
        let seen = load_error.clone();
        let shutdown = async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                Ok(e) = fail_rx => {
                    tracing::error!(error = %e, "a model failed to load; shutting down");
                    *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
        };
        api.serve(listener, shutdown).await?;
        tracing::info!("shut down cleanly");
        let failed = load_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        match failed {
            Some(e) => anyhow::bail!("{e}"),
            None => Ok(()),
        }
    })
}

/// The committed `openapi/openapi.json`, byte for byte.
pub fn print_openapi() {
    print!("{}", crate::api::openapi_json());
}
