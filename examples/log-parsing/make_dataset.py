"""Generate the log-parsing example data: raw syslog/auth.log lines and the JSON fields a parser
should extract. Synthetic by design (real auth logs are exactly the data we must not publish):
the line shapes follow OpenSSH, sudo, su, shadow-utils, systemd-logind and cron as they appear
in Debian's /var/log/auth.log and syslog; hosts, users and addresses are drawn from small pools
(RFC 5737 documentation addresses, example.com names). Fixed seed, so the files are reproducible:

    python examples/log-parsing/make_dataset.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HOSTS = ["web01", "web02", "bastion", "db-primary", "build7", "vpn-gw", "mail01", "jump2"]
USERS = [
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "mallory",
    "oscar",
    "deploy",
    "backup",
    "admin",
    "git",
]
NETS = ["192.0.2.", "198.51.100.", "203.0.113."]
COMMANDS = [
    "/usr/bin/systemctl restart nginx",
    "/usr/bin/apt-get upgrade -y",
    "/bin/cat /etc/shadow",
    "/usr/bin/journalctl -u sshd",
    "/usr/sbin/iptables -L",
    "/usr/bin/docker ps",
]
CRON = [
    "/usr/local/bin/backup.sh",
    "run-parts /etc/cron.hourly",
    "/opt/app/bin/rotate-logs",
    "test -x /usr/sbin/anacron",
]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def example(rng: random.Random, index: int) -> dict[str, object]:
    month, day = rng.choice(MONTHS), rng.randint(1, 28)
    clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
    timestamp = f"{month} {day:>2} {clock}"
    host, user, pid = rng.choice(HOSTS), rng.choice(USERS), rng.randint(300, 65000)
    ip, port = rng.choice(NETS) + str(rng.randint(1, 254)), rng.randint(1024, 65535)
    kind = rng.choice(["failed", "accepted", "sudo", "su", "useradd", "logind", "cron"])
    fields: dict[str, object] = {"timestamp": timestamp, "host": host}
    if kind in ("failed", "accepted"):
        method = rng.choice(["password", "publickey"]) if kind == "accepted" else "password"
        invalid = "invalid user " if kind == "failed" and rng.random() < 0.4 else ""
        verb = "Failed" if kind == "failed" else "Accepted"
        line = f"{timestamp} {host} sshd[{pid}]: {verb} {method} for {invalid}{user} from {ip} port {port} ssh2"
        fields |= {
            "program": "sshd",
            "pid": pid,
            "event": f"ssh_login_{kind}",
            "user": user,
            "source_ip": ip,
            "port": port,
            "method": method,
        }
    elif kind == "sudo":
        command = rng.choice(COMMANDS)
        line = f"{timestamp} {host} sudo: {user} : TTY=pts/{rng.randint(0, 9)} ; PWD=/home/{user} ; USER=root ; COMMAND={command}"
        fields |= {"program": "sudo", "event": "sudo_command", "user": user, "command": command}
    elif kind == "su":
        line = f"{timestamp} {host} su[{pid}]: pam_unix(su:session): session opened for user root by {user}(uid=1000)"
        fields |= {"program": "su", "pid": pid, "event": "su_session", "user": user}
    elif kind == "useradd":
        line = f"{timestamp} {host} useradd[{pid}]: new user: name={user}, UID={rng.randint(1001, 1999)}, GID=100, home=/home/{user}, shell=/bin/bash"
        fields |= {"program": "useradd", "pid": pid, "event": "user_added", "user": user}
    elif kind == "logind":
        line = f"{timestamp} {host} systemd-logind[{pid}]: New session {rng.randint(1, 9999)} of user {user}."
        fields |= {"program": "systemd-logind", "pid": pid, "event": "session_opened", "user": user}
    else:
        command = rng.choice(CRON)
        line = f"{timestamp} {host} CRON[{pid}]: ({user}) CMD ({command})"
        fields |= {
            "program": "CRON",
            "pid": pid,
            "event": "cron_command",
            "user": user,
            "command": command,
        }
    return {"id": f"log-{index:05d}", "text": line, "fields": json.dumps(fields)}


def main() -> None:
    rng = random.Random(20261123)
    out = Path(__file__).with_name("data")
    out.mkdir(exist_ok=True)
    rows = [example(rng, i) for i in range(500)]
    for name, part in (("train", rows[:400]), ("validation", rows[400:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()
