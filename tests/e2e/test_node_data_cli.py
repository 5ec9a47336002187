"""`fedllm node init` / `fedllm node scan` as an operator runs them (real processes)."""

import json
import stat

from tests.conftest import run_cli


def test_node_init_then_scan(tmp_path):
    data = tmp_path / "tickets.tsv"
    data.write_text("customer\tsentence\tlabel\n"
                    "c1\tHi, I am Jane Doe, mail jane.doe@example.com\t1\n"
                    "c1\tcard 4111 1111 1111 1111 charged twice, call +1 415-555-0132\t0\n"
                    "c2\ta charming film\t1\n", encoding="utf-8")
    (tmp_path / "names.txt").write_text("Jane Doe\n", encoding="utf-8")
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nname = "acme"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[data]\npath = "{data}"\nuser_column = "customer"\n'
                   f'[redaction]\nnames_file = "{tmp_path / "names.txt"}"\n'
                   "[contribution]\nmax_examples_per_user = 1\n", encoding="utf-8")
    init = run_cli(["node", "init", "-c", str(cfg)], tmp_path / "home")
    assert init.returncode == 0, init.stderr
    key = tmp_path / "state" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and "created" in init.stdout
    before = key.read_bytes()
    again = run_cli(["node", "init", "-c", str(cfg)], tmp_path / "home")
    assert again.returncode == 0 and key.read_bytes() == before  # never a new key

    scan = run_cli(["node", "scan", "-c", str(cfg), "--json"], tmp_path / "home")
    assert scan.returncode == 0, scan.stderr
    out = json.loads(scan.stdout)
    assert out["counts"] == {"email": 1, "phone": 1, "url": 0, "ip": 0, "credit_card": 1,
                             "iban": 0, "person": 1}
    assert out["rows_with_pii"] == 2 and out["users"] == 2 and out["rows_after_cap"] == 2
    assert [e["line"] for e in out["examples"]] == [2, 3]
    assert out["examples"][0]["text"] == "Hi, I am <PERSON>, mail <EMAIL>"
    for secret in ("Jane", "jane.doe", "4111", "415-555"):
        assert secret not in scan.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nname = "acme"\n[data]\npath = "x.tsv"\n'
                   "[contribution]\nmax_examples_per_user = 5\n", encoding="utf-8")
    res = run_cli(["node", "scan", "-c", str(bad)], tmp_path / "home")
    assert res.returncode == 2 and "needs data.user_column" in res.stderr
