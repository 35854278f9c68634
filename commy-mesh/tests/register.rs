//! Registrars: the instances a handle serves over TLS are announced to each
//! registrar it was given while they serve, and withdrawn when they stop.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use commy_mesh::discovery::{DiscoveryError, Instance, Register, Registration};
use commy_mesh::{Code, Mesh, Request, Response, Status};

fn private_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = std::env::temp_dir().join(format!("commy-register-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

/// Keeps the announced instances as `<service> <endpoint>` lines; refuses
/// every instance of the service `refused`.
#[derive(Default)]
struct Catalog {
    entries: Arc<Mutex<Vec<String>>>,
    refused: Option<&'static str>,
}

impl Register for Catalog {
    fn name(&self) -> &'static str {
        "catalog"
    }

    fn register(&self, instance: &Instance) -> Result<Registration, DiscoveryError> {
        if self.refused == Some(instance.service.as_str()) {
            return Err(DiscoveryError::Registry {
                registry: "catalog".into(),
                reason: "the catalog is full".into(),
            });
        }
        let entry = format!("{} {}", instance.service, instance.endpoint);
        self.entries.lock().unwrap().push(entry.clone());
        let entries = self.entries.clone();
        Ok(Registration::new(move || {
            entries.lock().unwrap().retain(|e| *e != entry);
        }))
    }
}

async fn echo(req: Request) -> Result<Response, Status> {
    Ok(Response::new(req.into_payload()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_instances_are_announced_while_they_serve() {
    let dir = private_dir("announce");
    let first = Arc::new(Catalog::default());
    let second = Arc::new(Catalog {
        refused: Some("refused"),
        ..Catalog::default()
    });
    let mesh = Mesh::builder()
        .runtime_dir(&dir)
        .listen("tls://127.0.0.1:0")
        .register_with(first.clone())
        .register_with(second.clone())
        .open()
        .await
        .unwrap();
    let port = mesh.tls_endpoint().unwrap().port();
    let expected = format!("echo tls://127.0.0.1:{port}");

    let handle = mesh.serve("echo", echo).await.unwrap();
    for catalog in [&first, &second] {
        assert_eq!(
            *catalog.entries.lock().unwrap(),
            std::slice::from_ref(&expected)
        );
    }

    // A registrar that refuses fails the serve, and nothing stays
    // announced or served.
    let refused = mesh.serve("refused", echo).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused.message().contains("catalog") && refused.message().contains("the catalog is full"),
        "{refused}"
    );
    assert_eq!(
        *first.entries.lock().unwrap(),
        std::slice::from_ref(&expected)
    );
    assert_eq!(
        mesh.call("refused", &b"x"[..]).await.unwrap_err().code(),
        Code::NotFound
    );

    // Stopping the service withdraws it everywhere.
    drop(handle);
    assert!(first.entries.lock().unwrap().is_empty());
    assert!(second.entries.lock().unwrap().is_empty());
    let _again = mesh.serve("echo", echo).await.unwrap();
    mesh.close().await;
    assert!(
        first.entries.lock().unwrap().is_empty(),
        "close withdraws too"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_that_does_not_listen_announces_nothing() {
    let dir = private_dir("local-only");
    let catalog = Arc::new(Catalog::default());
    let mut net = commy_mesh::NetConfig::default();
    net.no_listen = true;
    let mesh = Mesh::builder()
        .runtime_dir(&dir)
        .net(net)
        .register_with(catalog.clone())
        .open()
        .await
        .unwrap();
    let _echo = mesh.serve("echo", echo).await.unwrap();
    assert!(catalog.entries.lock().unwrap().is_empty());
    assert_eq!(&mesh.call("echo", &b"hi"[..]).await.unwrap()[..], b"hi");
    mesh.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
