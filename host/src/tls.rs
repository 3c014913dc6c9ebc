//! TLS for outgoing HTTPS (webhooks, the CLI client) uses rustls with the
//! `ring` provider, which builds with nothing but a C compiler.

/// Installs `ring` as rustls's process-wide crypto provider. Call before
/// building any `reqwest::Client`; calling it again is harmless.
pub fn init() {
    // Err means a provider is already installed, which is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
