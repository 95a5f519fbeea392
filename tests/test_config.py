import tomllib

import pytest

from node.config import (
    CONFIG_TEMPLATE,
    ConfigError,
    NodeConfig,
    default_data_dir,
    load_config_file,
    parse_host_port,
    write_default_config,
)


def test_default_data_dir_precedence(tmp_path):
    assert default_data_dir({"COOP_HOME": str(tmp_path)}) == tmp_path
    assert default_data_dir({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "coop"
    assert default_data_dir({}).parts[-3:] == (".local", "share", "coop")


def test_default_config_is_commented_valid_toml_with_the_defaults(tmp_path):
    path = tmp_path / "config.toml"
    write_default_config(path)
    text = path.read_text()
    assert text.count("#") > 10
    tomllib.loads(text)
    loaded = load_config_file(path, NodeConfig(data_dir=tmp_path))
    assert loaded.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert (loaded.api_host, loaded.api_port) == ("127.0.0.1", 7410)
    assert loaded.ad_refresh_seconds == 60
    assert loaded.ad_ttl_seconds == 120
    assert loaded.provide is True
    assert "listen" in CONFIG_TEMPLATE


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[network\nlisten = 1", "not valid TOML"),
        ("[nework]\nlisten = []", "unknown section [nework]"),
        ("[network]\nlisen = []", "unknown key(s) lisen in [network]"),
        ('[network]\nlisten = "/ip4/1.2.3.4/tcp/1"', "network.listen: expected a list"),
        ("[network]\nbootstrap = [1, 2]", "network.bootstrap must be a list of multiaddr strings"),
        ('[provide]\nenabled = "yes"', "provide.enabled: expected true or false"),
        ("[provide]\nad_ttl_seconds = -5", "provide.ad_ttl_seconds: must be positive"),
        ("[pricing]\nper_cpu_second = -1", "[pricing] per_cpu_second must be in"),
        ("[pricing]\nper_cpu_second = true", "pricing.per_cpu_second: expected an integer, got a boolean"),
        ('[api]\nlisten = "localhost"', "api.listen: expected HOST:PORT"),
    ],
)
def test_bad_config_gives_a_clear_message(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path, NodeConfig(data_dir=tmp_path))
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "nope.toml", NodeConfig(data_dir=tmp_path))


def test_parse_host_port():
    assert parse_host_port("127.0.0.1:0", what="x") == ("127.0.0.1", 0)
    assert parse_host_port("[::1]:7410", what="x") == ("::1", 7410)
    with pytest.raises(ConfigError):
        parse_host_port("127.0.0.1:99999", what="x")
