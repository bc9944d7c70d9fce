from pathlib import Path

import pytest

from mcpp.config import NodeConfig, load_config
from mcpp.errors import ConfigError


def test_defaults_depend_on_role() -> None:
    assert load_config().listen_addr == "/ip4/127.0.0.1/tcp/0"
    assert load_config({"role": "bootstrap"}).listen_addr == "/ip4/127.0.0.1/tcp/4001"
    assert NodeConfig().mcp_port == 8765


def test_precedence_env_over_flag_over_file_over_default(tmp_path: Path) -> None:
    f = tmp_path / "node.yaml"
    f.write_text("mcp_port: 1111\nmcp-host: 10.0.0.1\nrole: bootstrap\ncapabilities: [a, b]\n")
    cfg = load_config({"mcp_port": 2222}, {}, str(f))
    assert (cfg.mcp_port, cfg.mcp_host, cfg.role, cfg.capabilities) == (2222, "10.0.0.1", "bootstrap", ("a", "b"))
    cfg = load_config({"mcp_port": 2222}, {"MCPP_MCP_PORT": "3333", "MCPP_BOOTSTRAP": "/a,/b"}, str(f))
    assert cfg.mcp_port == 3333
    assert cfg.bootstrap == ("/a", "/b")
    assert load_config({}, {}, None).mcp_port == 8765


def test_env_names_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("mcp_port: 4444\n")
    assert load_config({}, {"MCPP_CONFIG": str(f)}).mcp_port == 4444


@pytest.mark.parametrize(
    ("flags", "env", "field"),
    [
        ({"mcp_port": 70000}, {}, "mcp_port"),
        ({"role": "king"}, {}, "role"),
        ({}, {"MCPP_MCP_PORT": "abc"}, "MCPP_MCP_PORT"),
        ({}, {"MCPP_PING_INTERVAL_S": "-1"}, "ping_interval_s"),
        ({"listen": "garbage"}, {}, "listen"),
        ({}, {"MCPP_ANNOUNCE": "/ip4/not-an-ip/tcp/1"}, "MCPP_ANNOUNCE"),
        ({"data_dir": ""}, {}, "data_dir"),
    ],
)
def test_bad_values_name_the_field(flags: dict, env: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(flags, env)
    assert field in str(e.value)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("mcp_prot: 1\n")
    with pytest.raises(ConfigError, match="mcp_prot"):
        load_config({}, {}, str(f))
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config({}, {}, str(f))


def test_empty_yaml_value_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("mcp_host:\n")
    with pytest.raises(ConfigError, match="mcp_host"):
        load_config({}, {}, str(f))


def test_secrets_from_env_and_files_never_in_repr(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tok = tmp_path / "token"
    tok.write_text("t0ken-" + "x" * 30 + "\n")
    key = tmp_path / "swarm.key"
    key.write_text("/key/swarm/psk/1.0.0/\n/base16/\n" + "0f" * 32 + "\n")
    c = load_config({"token_file": str(tok), "swarm_key_file": str(key)}, {})
    assert c.token == "t0ken-" + "x" * 30 and c.swarm_key == "0f" * 32
    assert "t0ken" not in repr(c) and "0f0f" not in repr(c)
    c = load_config({}, {"MCPP_TOKEN": "e" * 20, "MCPP_SWARM_KEY": "ab" * 32, "MCPP_PROTECT_METRICS": "true"})
    assert c.token == "e" * 20 and c.swarm_key == "ab" * 32 and c.protect_metrics is True


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"MCPP_TOKEN": "short"}, "token.*at least 16"),
        ({"MCPP_SWARM_KEY": "abcd"}, "swarm_key.*32 bytes"),
        ({"MCPP_SWARM_KEY": "zz" * 32}, "swarm_key.*not hexadecimal"),
        ({"MCPP_TOKEN_FILE": "/nonexistent/token"}, "token_file.*cannot read"),
        ({"MCPP_PROTECT_METRICS": "maybe"}, "protect_metrics.*true or false"),
    ],
)
def test_bad_secrets_name_the_setting(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config({}, env)


def test_the_overlay_bounds_are_checked_and_name_the_setting() -> None:
    c = load_config({"degree_low": 2, "degree": 3, "degree_high": 4}, {})
    assert (c.degree_low, c.degree, c.degree_high, c.max_connections) == (2, 3, 4, 64)
    for flags, name in (({"degree_low": 9}, "degree_low"), ({"degree_high": 5}, "degree_high"),
                        ({"max_connections": 10}, "max_connections"), ({"degree": 0}, "degree")):
        with pytest.raises(ConfigError) as e:
            load_config(flags, {})
        assert name in str(e.value)
    assert load_config({}, {"MCPP_DEGREE": "10", "MCPP_DEGREE_HIGH": "16"}).degree == 10
