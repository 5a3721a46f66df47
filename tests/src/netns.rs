//! Network namespaces for mesh tests ("pods"): each gets a veth to a shared bridge-less link,
//! Istio's iptables rules, and is removed (with every process in it) when dropped. Needs root,
//! `ip` (iproute2) and `iptables`.

use std::process::{Child, Command, Stdio};

/// Runs a command, panicking with its output when it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process can make namespaces (root with iproute2 and iptables).
pub fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("mesh tests need root (network namespaces and iptables)".into());
    }
    for tool in ["ip", "iptables"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!(
                "mesh tests need '{tool}' (apt-get install iproute2 iptables)"
            ));
        }
    }
    None
}

/// A pod: a network namespace with one address on a veth pair to its peer pod.
pub struct Pod {
    pub name: String,
    pub ip: String,
    children: Vec<Child>,
}

impl Pod {
    /// Two pods joined by a veth pair: `10.<net>.0.1` and `10.<net>.0.2`.
    pub fn pair(tag: &str, net: u8) -> (Pod, Pod) {
        let a = format!("{tag}a");
        let b = format!("{tag}b");
        for n in [&a, &b] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "netns", "exec", n, "ip", "link", "set", "lo", "up"]);
        }
        let (va, vb) = (format!("{tag}va"), format!("{tag}vb"));
        sh(&[
            "ip", "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ]);
        let ip_a = format!("10.{net}.0.1");
        let ip_b = format!("10.{net}.0.2");
        for (ns, dev, ip) in [(&a, &va, &ip_a), (&b, &vb, &ip_b)] {
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "ip",
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                dev,
            ]);
            sh(&["ip", "netns", "exec", ns, "ip", "link", "set", dev, "up"]);
        }
        (
            Pod {
                name: a,
                ip: ip_a,
                children: Vec::new(),
            },
            Pod {
                name: b,
                ip: ip_b,
                children: Vec::new(),
            },
        )
    }

    /// A pod on `hub`'s bridge: namespace `<tag><name>` with `eth0` at `ip`/16; `index` names
    /// the hub's end of the veth (`<tag>h<index>`).
    pub fn on_hub(hub: &Hub, name: &str, ip: &str, index: usize) -> Pod {
        let ns = format!("{}{name}", hub.tag);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&["ip", "netns", "add", &ns]);
        let exec = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", ns.as_str()];
            all.extend_from_slice(args);
            sh(&all);
        };
        exec(&["ip", "link", "set", "lo", "up"]);
        let hub_end = format!("{}h{index}", hub.tag);
        sh(&[
            "ip", "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &hub_end,
            "netns", &hub.name,
        ]);
        sh(&[
            "ip", "netns", "exec", &hub.name, "ip", "link", "set", &hub_end, "master", "br0", "up",
        ]);
        exec(&["ip", "addr", "add", &format!("{ip}/16"), "dev", "eth0"]);
        exec(&["ip", "link", "set", "eth0", "up"]);
        Pod {
            name: ns,
            ip: ip.to_string(),
            children: Vec::new(),
        }
    }

    /// Starts a process in the pod as `uid`, in `cwd`, with its output in `log`; it is killed
    /// when the pod is dropped. Returns its pid (`ip netns exec` and `setpriv` exec it).
    pub fn spawn_logged(
        &mut self,
        uid: u32,
        cwd: &std::path::Path,
        cmd: &[&str],
        log: &std::path::Path,
    ) -> u32 {
        let out = std::fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        // The process's own file, as a container's streams are: proxies open `/dev/stdout` by
        // path for their access logs.
        std::os::unix::fs::fchown(&out, Some(uid), Some(uid)).expect("chown log");
        let err = out.try_clone().expect("log file");
        let ids = [format!("--reuid={uid}"), format!("--regid={uid}")];
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "setpriv"])
            .args(&ids)
            .arg("--clear-groups")
            .args(cmd)
            .current_dir(cwd)
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Istio's sidecar rules (istio-iptables): outbound TCP to 15001 except the proxy's own
    /// (uid 1337) and loopback; inbound TCP to 15006 except the proxy's ports.
    pub fn istio_iptables(&self) {
        let rules = [
            "-t nat -N ISTIO_INBOUND",
            "-t nat -N ISTIO_REDIRECT",
            "-t nat -N ISTIO_IN_REDIRECT",
            "-t nat -N ISTIO_OUTPUT",
            "-t nat -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
            "-t nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-t nat -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-t nat -A PREROUTING -p tcp -j ISTIO_INBOUND",
            "-t nat -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
            "-t nat -A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
            "-t nat -A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
            "-t nat -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
            "-t nat -A OUTPUT -p tcp -j ISTIO_OUTPUT",
            "-t nat -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
            "-t nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
            "-t nat -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
            "-t nat -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-t nat -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-t nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        ];
        for r in rules {
            let mut args = vec!["ip", "netns", "exec", &self.name, "iptables"];
            args.extend(r.split_whitespace());
            sh(&args);
        }
    }

    /// Starts a process in the pod (as `uid` when given); it is killed when the pod is dropped.
    pub fn spawn(&mut self, uid: Option<u32>, cmd: &[&str]) -> &mut Child {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]);
        let ids;
        if let Some(uid) = uid {
            ids = [format!("--reuid={uid}"), format!("--regid={uid}")];
            c.arg("setpriv").args(&ids).arg("--clear-groups");
        }
        c.args(cmd).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = c.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        self.children.push(child);
        self.children.last_mut().expect("just pushed")
    }

    /// Runs a command in the pod and returns its standard output.
    pub fn run(&self, cmd: &[&str]) -> String {
        self.try_run(cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    /// Runs a command in the pod: its standard output, or its error output when it failed.
    pub fn try_run(&self, cmd: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The link pods share: a namespace holding a bridge (`br0`) every pod's veth joins. Removed
/// when dropped; drop it after its pods.
pub struct Hub {
    pub tag: String,
    pub name: String,
}

impl Hub {
    /// A hub for pods named `<tag>…` (keep `tag` short: interface names are 15 bytes at most).
    pub fn new(tag: &str) -> Hub {
        let name = format!("{tag}hub");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        for args in [
            &["ip", "link", "add", "br0", "type", "bridge"][..],
            &["ip", "link", "set", "br0", "up"],
        ] {
            let mut all = vec!["ip", "netns", "exec", name.as_str()];
            all.extend_from_slice(args);
            sh(&all);
        }
        Hub {
            tag: tag.to_string(),
            name,
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespace removes its veth end (and so the pair) and its rules.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
