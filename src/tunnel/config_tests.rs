use super::*;

const AGENT: &str = "3f1c1b2e-8a4d-4c3e-9b7a-0d5e6f7a8b9c";

fn creds() -> FrpCredentials {
    FrpCredentials {
        server_addr: "frp.example.net".into(),
        server_port: 7000,
        token: Secret::new("tok-golden"),
        subdomain: "host-a1".into(),
    }
}

fn admin() -> WebServerConfig {
    WebServerConfig {
        addr: "127.0.0.1".into(),
        port: 41234,
        user: "qudata".into(),
        password: Secret::new("pw-golden"),
    }
}

#[test]
fn main_file_golden() {
    let main = main_config(&creds(), &admin(), Path::new("/etc/qudata/frpc.toml"), AGENT, 8123);
    let text = render(&main).unwrap();
    let expected = r#"serverAddr = "frp.example.net"
serverPort = 7000
loginFailExit = false
includes = ["/etc/qudata/frpc.d/*.toml"]

[auth]
method = "token"
token = "tok-golden"

[webServer]
addr = "127.0.0.1"
port = 41234
user = "qudata"
password = "pw-golden"

[[proxies]]
name = "3f1c1b2e-8a4d-4c3e-9b7a-0d5e6f7a8b9c-agent"
type = "http"
localIP = "127.0.0.1"
localPort = 8123
customDomains = ["host-a1"]
"#;
    assert_eq!(text, expected);
    // Read back: the agent recovers the admin credentials from this file after a restart.
    let back: ClientConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, main);
}

#[test]
fn include_file_golden() {
    let tunnels = InstanceTunnels {
        instance_id: "0b9c4d1e".into(),
        subdomain: "lease-7".into(),
        ports: vec![
            TunnelPort {
                container_port: 22,
                local: std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 42022),
                remote_port: 10001,
                proto: TunnelProto::Tcp,
            },
            TunnelPort {
                container_port: 8888,
                local: std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 42888),
                remote_port: 20000,
                proto: TunnelProto::Http,
            },
            TunnelPort {
                container_port: 80,
                local: std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 42080),
                remote_port: 443,
                proto: TunnelProto::Http,
            },
        ],
    };
    let text = render(&include_config(AGENT, &tunnels)).unwrap();
    let expected = r#"[[proxies]]
name = "3f1c1b2e-8a4d-4c3e-9b7a-0d5e6f7a8b9c-0b9c4d1e-22"
type = "tcp"
localIP = "127.0.0.1"
localPort = 42022
remotePort = 10001

[[proxies]]
name = "3f1c1b2e-8a4d-4c3e-9b7a-0d5e6f7a8b9c-0b9c4d1e-8888"
type = "http"
localIP = "127.0.0.1"
localPort = 42888
customDomains = ["lease-7:20000"]

[[proxies]]
name = "3f1c1b2e-8a4d-4c3e-9b7a-0d5e6f7a8b9c-0b9c4d1e-80"
type = "http"
localIP = "127.0.0.1"
localPort = 42080
customDomains = ["lease-7"]
"#;
    assert_eq!(text, expected);
}

#[test]
fn empty_include_still_parses() {
    let text = render(&IncludeFile::default()).unwrap();
    let back: IncludeFile = toml::from_str(&text).unwrap();
    assert!(back.proxies.is_empty());
}

#[test]
fn paths_derive_from_the_main_file() {
    let main = Path::new("/tmp/x/frpc.toml");
    assert_eq!(include_dir(main), Path::new("/tmp/x/frpc.d"));
    assert_eq!(include_path(main, "i-1"), Path::new("/tmp/x/frpc.d/i-1.toml"));
}
