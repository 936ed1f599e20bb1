"""
``hookah.config.build_config`` and ``hookah.tap.Options``: defaults, the TOML
file, ``HOOKAH_*`` variables, the command line, their precedence, and one
clear ``ConfigError`` naming the option for every kind of bad value.
"""

from __future__ import annotations

import gc

import io
import os
import re
from typing import Any, Dict, List

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python import usage
from twisted.trial.unittest import TestCase

from hookah import tap
from hookah.config import SETTINGS, Config, ConfigError, build_config, from_environment, read_toml
from hookah.defaults import RETRY_SCHEDULE as DEFAULT_SCHEDULE
from tests.support import ROOT, temp_dir


def write_file(testcase: TestCase, text: str, name: str = "hookah.toml") -> str:
    directory = temp_dir(testcase)
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class DefaultsTests(TestCase):
    def test_nothing_given_is_the_documented_defaults(self) -> None:
        config = build_config({}, {})
        self.assertEqual(config, Config())
        self.assertEqual(config.listen, "tcp:8080")
        self.assertEqual(config.storage, "sqlite:hookah.db")
        self.assertFalse(config.allow_private_targets)
        self.assertEqual(config.retry_schedule, DEFAULT_SCHEDULE)
        self.assertEqual(config.timeout, 30.0)
        self.assertEqual(config.keepalive, 30.0)
        self.assertIsNone(config.public_url)
        self.assertEqual(config.signing_secrets, ())
        self.assertEqual(config.lease_bounds, (60, 864000, 2592000))
        self.assertEqual(config.max_body, 1024 * 1024)

    def test_default_retry_schedule_is_about_a_day(self) -> None:
        total = sum(DEFAULT_SCHEDULE)
        self.assertTrue(20 * 3600 <= total <= 28 * 3600, total)

    def test_none_values_from_the_command_line_are_ignored(self) -> None:
        self.assertEqual(build_config({"port": None, "storage": None, "allow-private-targets": None}, {}), Config())

    def test_unrelated_environment_is_ignored(self) -> None:
        self.assertEqual(build_config({}, {"PORT": "1", "HOME": "/root", "HOOKAHPORT": "2"}), Config())


class ListenTests(TestCase):
    def test_port_alone(self) -> None:
        self.assertEqual(build_config({"port": "9000"}, {}).listen, "tcp:9000")

    def test_port_and_interface(self) -> None:
        config = build_config({"port": "9000", "interface": "127.0.0.1"}, {})
        self.assertEqual(config.listen, "tcp:9000:interface=127.0.0.1")

    def test_interface_alone_keeps_the_default_port(self) -> None:
        self.assertEqual(build_config({"interface": "127.0.0.1"}, {}).listen, "tcp:8080:interface=127.0.0.1")

    def test_ipv6_interface_is_escaped_for_the_endpoint_parser(self) -> None:
        from twisted.internet.endpoints import _parseServer  # type: ignore[attr-defined]

        listen = build_config({"port": "9000", "interface": "::1"}, {}).listen
        self.assertEqual(listen, "tcp:9000:interface=\\:\\:1")
        self.assertEqual(_parseServer(listen, None)[2].get("interface"), "::1")

    def test_listen_overrides_port_and_interface(self) -> None:
        config = build_config({"port": "9000", "interface": "127.0.0.1", "listen": "tcp:7000"}, {})
        self.assertEqual(config.listen, "tcp:7000")

    def test_listen_takes_any_endpoint(self) -> None:
        for endpoint in ("tcp:8443:interface=127.0.0.1", "unix:/tmp/hookah.sock"):
            self.assertEqual(build_config({"listen": endpoint}, {}).listen, endpoint)

    def test_listen_with_a_missing_key_file_is_a_config_error(self) -> None:
        e = self.assertRaises(ConfigError, build_config, {"listen": "ssl:8443:privateKey=/nonexistent/k.pem"}, {})
        self.assertIn("--listen", str(e))

    def test_port_from_the_environment(self) -> None:
        self.assertEqual(build_config({}, {"HOOKAH_PORT": "9100"}).listen, "tcp:9100")

    def test_interface_from_the_file_with_port_from_the_command_line(self) -> None:
        path = write_file(self, 'interface = "127.0.0.1"\nport = 1\n')
        self.assertEqual(build_config({"port": "9000"}, {}, path).listen, "tcp:9000:interface=127.0.0.1")


class TomlTests(TestCase):
    def test_hookah_table(self) -> None:
        path = write_file(
            self,
            """
            [hookah]
            port = 9001
            interface = "127.0.0.1"
            storage = "memory:"
            allow_private_targets = true
            retry_schedule = [1, 2.5, 300]
            timeout = 2.5
            keepalive = 15
            public_url = "https://hooks.example.com/"
            signing_secret = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "plain-text-secret"]
            lease_bounds = [10, 20, 30]
            """,
        )
        config = build_config({}, {}, path)
        self.assertEqual(config.listen, "tcp:9001:interface=127.0.0.1")
        self.assertEqual(config.storage, "memory:")
        self.assertTrue(config.allow_private_targets)
        self.assertEqual(config.retry_schedule, (1.0, 2.5, 300.0))
        self.assertEqual(config.timeout, 2.5)
        self.assertEqual(config.keepalive, 15.0)
        self.assertEqual(config.public_url, "https://hooks.example.com/")
        self.assertEqual(config.signing_secrets, ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "plain-text-secret"))
        self.assertEqual(config.lease_bounds, (10, 20, 30))

    def test_top_level_keys_without_a_table(self) -> None:
        path = write_file(self, 'port = 9002\nstorage = "sqlite:/var/lib/hookah.db"\nretry_schedule = "5,300,1800"\n')
        config = build_config({}, {}, path)
        self.assertEqual(config.listen, "tcp:9002")
        self.assertEqual(config.storage, "sqlite:/var/lib/hookah.db")
        self.assertEqual(config.retry_schedule, (5.0, 300.0, 1800.0))

    def test_dashed_keys_like_the_command_line(self) -> None:
        path = write_file(self, '[hookah]\nretry-schedule = [7]\nallow-private-targets = true\n')
        config = build_config({}, {}, path)
        self.assertEqual(config.retry_schedule, (7.0,))
        self.assertTrue(config.allow_private_targets)

    def test_strings_as_on_the_command_line(self) -> None:
        path = write_file(self, '[hookah]\nport = "9003"\ntimeout = "4"\nlease_bounds = "1,2,3"\n')
        config = build_config({}, {}, path)
        self.assertEqual(config.listen, "tcp:9003")
        self.assertEqual(config.timeout, 4.0)
        self.assertEqual(config.lease_bounds, (1, 2, 3))

    def test_empty_file_is_the_defaults(self) -> None:
        self.assertEqual(build_config({}, {}, write_file(self, "")), Config())

    def test_config_path_from_the_environment(self) -> None:
        path = write_file(self, "port = 9004\n")
        self.assertEqual(build_config({}, {"HOOKAH_CONFIG": path}).listen, "tcp:9004")

    def test_explicit_path_beats_the_environment_path(self) -> None:
        env_path = write_file(self, "port = 1111\n")
        path = write_file(self, "port = 2222\n")
        self.assertEqual(build_config({}, {"HOOKAH_CONFIG": env_path}, path).listen, "tcp:2222")

    def test_unknown_key_is_named(self) -> None:
        path = write_file(self, "[hookah]\nprot = 9000\n")
        e = self.assertRaises(ConfigError, build_config, {}, {}, path)
        self.assertIn("'prot'", str(e))
        self.assertIn(path, str(e))

    def test_missing_file_is_named(self) -> None:
        path = os.path.join(temp_dir(self), "missing", "hookah.toml")
        e = self.assertRaises(ConfigError, build_config, {}, {}, path)
        self.assertIn(path, str(e))
        self.assertIn("No such file", str(e))

    def test_a_directory_is_not_a_config_file(self) -> None:
        directory = temp_dir(self)
        e = self.assertRaises(ConfigError, build_config, {}, {}, directory)
        self.assertIn(directory, str(e))

    def test_invalid_toml_is_named(self) -> None:
        path = write_file(self, "[hookah\nport = \n")
        e = self.assertRaises(ConfigError, build_config, {}, {}, path)
        self.assertIn(path, str(e))
        self.assertIn("not valid TOML", str(e))

    def test_bad_value_in_the_file_names_the_option(self) -> None:
        path = write_file(self, '[hookah]\ntimeout = "soon"\n')
        e = self.assertRaises(ConfigError, build_config, {}, {}, path)
        self.assertIn("--timeout", str(e))

    def test_read_toml_maps_underscores_to_option_names(self) -> None:
        path = write_file(self, "[hookah]\nmax_body = 10\nhost-concurrency = 2\n")
        self.assertEqual(read_toml(path), {"max-body": 10, "host-concurrency": 2})


class EnvironmentTests(TestCase):
    def test_every_option_has_a_variable(self) -> None:
        environ = {"HOOKAH_" + s.name.upper().replace("-", "_"): "x" for s in SETTINGS}
        self.assertEqual(set(from_environment(environ)), {s.name for s in SETTINGS})

    def test_values(self) -> None:
        config = build_config(
            {},
            {
                "HOOKAH_PORT": "9005",
                "HOOKAH_STORAGE": "memory:",
                "HOOKAH_ALLOW_PRIVATE_TARGETS": "true",
                "HOOKAH_RETRY_SCHEDULE": "1, 2 ,3",
                "HOOKAH_TIMEOUT": "0.5",
                "HOOKAH_SIGNING_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw other-secret",
                "HOOKAH_LEASE_BOUNDS": "5,6,7",
                "HOOKAH_PUBLIC_URL": "http://localhost:8080",
            },
        )
        self.assertEqual(config.listen, "tcp:9005")
        self.assertEqual(config.storage, "memory:")
        self.assertTrue(config.allow_private_targets)
        self.assertEqual(config.retry_schedule, (1.0, 2.0, 3.0))
        self.assertEqual(config.timeout, 0.5)
        self.assertEqual(config.signing_secrets, ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "other-secret"))
        self.assertEqual(config.lease_bounds, (5, 6, 7))
        self.assertEqual(config.public_url, "http://localhost:8080")

    def test_boolean_spellings(self) -> None:
        for text in ("1", "true", "TRUE", "yes", "on", " True "):
            self.assertTrue(build_config({}, {"HOOKAH_ALLOW_PRIVATE_TARGETS": text}).allow_private_targets, text)
        for text in ("0", "false", "no", "off", ""):
            self.assertFalse(build_config({}, {"HOOKAH_ALLOW_PRIVATE_TARGETS": text}).allow_private_targets, text)

    def test_bad_value_names_the_option(self) -> None:
        e = self.assertRaises(ConfigError, build_config, {}, {"HOOKAH_ALLOW_PRIVATE_TARGETS": "perhaps"})
        self.assertIn("--allow-private-targets", str(e))


class PrecedenceTests(TestCase):
    def setUp(self) -> None:
        self.path = write_file(self, '[hookah]\nport = 1001\ntimeout = 11\nstorage = "sqlite:file.db"\n')
        self.environ = {"HOOKAH_PORT": "1002", "HOOKAH_TIMEOUT": "12"}

    def test_file_alone(self) -> None:
        config = build_config({}, {}, self.path)
        self.assertEqual((config.listen, config.timeout, config.storage), ("tcp:1001", 11.0, "sqlite:file.db"))

    def test_environment_beats_file(self) -> None:
        config = build_config({}, self.environ, self.path)
        self.assertEqual((config.listen, config.timeout, config.storage), ("tcp:1002", 12.0, "sqlite:file.db"))

    def test_command_line_beats_environment_and_file(self) -> None:
        config = build_config({"port": "1003"}, self.environ, self.path)
        self.assertEqual((config.listen, config.timeout, config.storage), ("tcp:1003", 12.0, "sqlite:file.db"))

    def test_a_bad_value_that_is_overridden_does_not_matter(self) -> None:
        # Only the winning value is checked: a stale bad HOOKAH_PORT does not
        # stop a server given a good --port.
        config = build_config({"port": "1004"}, {"HOOKAH_PORT": "not-a-port"}, self.path)
        self.assertEqual(config.listen, "tcp:1004")

    def test_flag_on_command_line_beats_false_in_environment(self) -> None:
        config = build_config({"allow-private-targets": True}, {"HOOKAH_ALLOW_PRIVATE_TARGETS": "false"})
        self.assertTrue(config.allow_private_targets)


# Every kind of bad value, per option: (option, value). Each must raise a
# ConfigError whose message names the option, from any of the three sources.
BAD_VALUES: List[tuple] = [
    ("port", "abc"),
    ("port", "-1"),
    ("port", "65536"),
    ("port", "1.5"),
    ("port", ""),
    ("storage", "foo:"),
    ("storage", "sqlite:"),
    ("storage", ""),
    ("storage", "hookah.db"),
    ("storage", "postgresql://localhost/hookah?nosuchoption=1"),
    ("claim-lease", "0"),
    ("allow-private-targets", "maybe"),
    ("allowed-networks", "not-a-network"),
    ("allowed-networks", "10.0.0.0/8,300.1.1.1"),
    ("retry-schedule", ""),
    ("retry-schedule", ","),
    ("retry-schedule", "x"),
    ("retry-schedule", "5,-1"),
    ("retry-schedule", "5,nan"),
    ("retry-schedule", "inf"),
    ("timeout", "0"),
    ("timeout", "-3"),
    ("timeout", "soon"),
    ("timeout", "nan"),
    ("timeout", "inf"),
    ("keepalive", "0"),
    ("keepalive", "x"),
    ("public-url", "ftp://example.com/"),
    ("public-url", "example.com"),
    ("public-url", "http://"),
    ("lease-bounds", "1,2"),
    ("lease-bounds", "1,2,3,4"),
    ("lease-bounds", "3,2,1"),
    ("lease-bounds", "0,1,2"),
    ("lease-bounds", "a,b,c"),
    ("max-body", "0"),
    ("max-body", "1MB"),
    ("concurrency", "0"),
    ("concurrency", "100001"),
    ("host-concurrency", "0"),
    ("breaker-threshold", "0"),
    ("breaker-cooldown", "0"),
    ("breaker-window", "-1"),
    ("breaker-pause", "0"),
    ("history-count", "-1"),
    ("history-age", "0"),
    ("idempotency-window", "-5"),
    ("stream-buffer", "10"),
    ("log-format", "xml"),
    ("signing-secret", "whsec_not*base64"),
]


def _toml_value(value: Any) -> str:
    import json

    return json.dumps(value)  # a JSON string or number is a TOML one too


class BadValueTests(TestCase):
    def assert_names(self, name: str, call: Any, *args: Any) -> ConfigError:
        e = self.assertRaises(ConfigError, call, *args)
        self.assertIn(f"--{name}", str(e))
        self.assertNotIn("\n", str(e))
        return e

    def test_command_line(self) -> None:
        for name, value in BAD_VALUES:
            with self.subTest(name=name, value=value):
                self.assert_names(name, build_config, {name: value}, {})

    def test_environment(self) -> None:
        for name, value in BAD_VALUES:
            with self.subTest(name=name, value=value):
                self.assert_names(name, build_config, {}, {"HOOKAH_" + name.upper().replace("-", "_"): value})

    def test_file(self) -> None:
        for name, value in BAD_VALUES:
            with self.subTest(name=name, value=value):
                path = write_file(self, f"[hookah]\n{name} = {_toml_value(value)}\n")
                self.assert_names(name, build_config, {}, {}, path)

    def test_wrong_toml_types(self) -> None:
        cases = [
            ("port", "true"),
            ("port", "1.5"),
            ("port", "[8080]"),
            ("timeout", "[1]"),
            ("timeout", "{ seconds = 1 }"),
            ("retry-schedule", "[]"),
            ("retry-schedule", '[1, "x"]'),
            ("lease-bounds", "[1, 2]"),
            ("max-body", "1.5"),
            ("allow-private-targets", '"maybe"'),
            ("log-format", "1"),
            ("storage", "5"),
        ]
        for name, toml in cases:
            with self.subTest(name=name, toml=toml):
                path = write_file(self, f"[hookah]\n{name} = {toml}\n")
                self.assert_names(name, build_config, {}, {}, path)

    def test_postgresql_urls_are_accepted(self) -> None:
        for url in (
            "postgresql://hookah@db.example/hookah",
            "postgres://hookah:secret@db.example:5433/hookah?sslmode=require",
            "postgresql://",  # everything from PGHOST, PGUSER, ...
            "postgresql:///hookah?host=/var/run/postgresql",
        ):
            with self.subTest(url=url):
                self.assertEqual(build_config({"storage": url}, {}).storage, url)

    def test_config_errors_are_value_errors(self) -> None:
        self.assertTrue(issubclass(ConfigError, ValueError))


finite_seconds = st.floats(min_value=0.001, max_value=10**7, allow_nan=False, allow_infinity=False)
SETTING_NAMES = [s.name for s in SETTINGS]
# Settings that take any text (endpoint strings, addresses, tokens, prefixes).
FREE_TEXT = {"interface", "listen", "signing-secret", "publisher-token", "admin-token", "topic-allow"}


class PropertyTests(TestCase):
    @given(st.lists(finite_seconds, min_size=1, max_size=12), st.sampled_from([",", ", ", " ", " , "]))
    def test_retry_schedule_round_trips_as_text(self, steps: List[float], separator: str) -> None:
        text = separator.join(repr(s) for s in steps)
        self.assertEqual(build_config({"retry-schedule": text}, {}).retry_schedule, tuple(steps))
        self.assertEqual(build_config({}, {"HOOKAH_RETRY_SCHEDULE": text}).retry_schedule, tuple(steps))

    @settings(deadline=None)
    @given(st.lists(finite_seconds | st.integers(min_value=1, max_value=10**6), min_size=1, max_size=12))
    def test_retry_schedule_round_trips_as_a_toml_array(self, steps: List[float]) -> None:
        path = write_file(self, "retry_schedule = [" + ", ".join(repr(s) for s in steps) + "]\n")
        self.assertEqual(build_config({}, {}, path).retry_schedule, tuple(float(s) for s in steps))

    @given(st.integers(min_value=0, max_value=65535), st.sampled_from(["", "127.0.0.1", "0.0.0.0", "::1", "::"]))
    def test_port_and_interface_make_a_parsable_endpoint(self, port: int, interface: str) -> None:
        from twisted.internet.endpoints import _parseServer  # type: ignore[attr-defined]

        listen = build_config({"port": str(port), "interface": interface or None}, {}).listen
        kind, args, kwargs = _parseServer(listen, None)
        self.assertEqual((kind, args), ("TCP", (port, None)))
        self.assertEqual(kwargs.get("interface", ""), interface)

    @given(
        st.sampled_from([n for n in SETTING_NAMES if n not in FREE_TEXT]),
        st.text(max_size=30),
    )
    def test_any_text_is_a_value_or_a_config_error_naming_the_option(self, name: str, text: str) -> None:
        # Never a bare ValueError/TypeError: that would be a traceback at start-up.
        try:
            build_config({name: text}, {})
        except ConfigError as e:
            self.assertIn(f"--{name}", str(e))


class OptionsTests(TestCase):
    def setUp(self) -> None:
        self.environ: Dict[str, str] = {}
        self.patch(tap.os, "environ", self.environ)
        self.stderr = io.StringIO()
        self.patch(tap.sys, "stderr", self.stderr)

    def parse(self, *argv: str) -> Config:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options.config

    def test_defaults(self) -> None:
        self.assertEqual(self.parse(), Config())

    def test_every_setting_is_an_option(self) -> None:
        options = tap.Options()
        names = {o[0] for o in options.optFlags} | {o[0] for o in options.optParameters}
        self.assertEqual(names, {s.name for s in SETTINGS} | {"config"})

    def test_readme_documents_every_option(self) -> None:
        # The README's option table is the reference: each row names a real
        # option, and every option has its row.
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            rows = [line for line in f if line.startswith("| `--")]
        documented = {re.match(r"\| `--([a-z-]+)`", row).group(1) for row in rows}  # type: ignore[union-attr]
        options = tap.Options()
        names = {o[0] for o in options.optFlags} | {o[0] for o in options.optParameters}
        self.assertEqual(documented, names)

    def test_port_and_interface(self) -> None:
        self.assertEqual(self.parse("--port", "9000", "--interface", "127.0.0.1").listen, "tcp:9000:interface=127.0.0.1")

    def test_short_options(self) -> None:
        path = write_file(self, "timeout = 3\n")
        config = self.parse("-p", "9001", "-c", path)
        self.assertEqual((config.listen, config.timeout), ("tcp:9001", 3.0))

    def test_equals_syntax(self) -> None:
        self.assertEqual(self.parse("--port=9002", "--storage=memory:").storage, "memory:")

    def test_listen_overrides_port(self) -> None:
        self.assertEqual(self.parse("--port", "9000", "--listen", "tcp:7000:interface=127.0.0.1").listen, "tcp:7000:interface=127.0.0.1")

    def test_flag(self) -> None:
        self.assertTrue(self.parse("--allow-private-targets").allow_private_targets)
        self.assertFalse(self.parse().allow_private_targets)

    def test_flag_absent_leaves_the_environment_in_charge(self) -> None:
        self.environ["HOOKAH_ALLOW_PRIVATE_TARGETS"] = "yes"
        self.assertTrue(self.parse().allow_private_targets)

    def test_retry_schedule_and_others(self) -> None:
        config = self.parse("--retry-schedule", "1", "--timeout", "2", "--signing-secret", "whsec_dGVzdA==", "--lease-bounds", "1,2,3")
        self.assertEqual(config.retry_schedule, (1.0,))
        self.assertEqual(config.timeout, 2.0)
        self.assertEqual(config.signing_secrets, ("whsec_dGVzdA==",))
        self.assertEqual(config.lease_bounds, (1, 2, 3))

    def test_command_line_beats_environment_beats_file(self) -> None:
        path = write_file(self, "port = 1\ntimeout = 1\nkeepalive = 1\n")
        self.environ.update({"HOOKAH_PORT": "2", "HOOKAH_TIMEOUT": "2"})
        config = self.parse("--config", path, "--port", "3")
        self.assertEqual((config.listen, config.timeout, config.keepalive), ("tcp:3", 2.0, 1.0))

    def test_config_from_environment_variable(self) -> None:
        self.environ["HOOKAH_CONFIG"] = write_file(self, "port = 9009\n")
        self.assertEqual(self.parse().listen, "tcp:9009")

    def assert_exits_with_one_line(self, *argv: str) -> str:
        e = self.assertRaises(SystemExit, self.parse, *argv)
        self.assertEqual(e.code, 2)
        output = self.stderr.getvalue()
        self.assertEqual(len(output.splitlines()), 1, output)
        self.assertTrue(output.startswith("hookah: ") and output.endswith("\n"), output)
        return output

    def test_bad_port_exits_with_one_line(self) -> None:
        self.assertIn("--port", self.assert_exits_with_one_line("--port", "abc"))

    def test_bad_storage_exits_with_one_line(self) -> None:
        self.assertIn("--storage", self.assert_exits_with_one_line("--storage", "foo:"))

    def test_missing_config_file_exits_with_one_line(self) -> None:
        self.assertIn("/nonexistent", self.assert_exits_with_one_line("--config", "/nonexistent/hookah.toml"))

    def test_bad_environment_exits_with_one_line(self) -> None:
        self.environ["HOOKAH_TIMEOUT"] = "never"
        self.assertIn("--timeout", self.assert_exits_with_one_line())

    def test_unknown_option_is_a_usage_error(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--no-such-option")

    def test_make_service(self) -> None:
        from twisted.application.service import IService
        from twisted.internet.testing import MemoryReactorClock

        options = tap.Options()
        options.parseOptions(["--storage", "memory:", "--port", "0", "--interface", "127.0.0.1"])
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        self.addCleanup(gc.unfreeze)
        service = tap.makeService(options, MemoryReactorClock())
        self.assertTrue(IService.providedBy(service))
        self.assertEqual(service.config, options.config)
        # The server's process collects its young generation rarely, with
        # what start-up built frozen out of collections.
        self.assertEqual(gc.get_threshold()[0], tap.YOUNG_COLLECTION_THRESHOLD)
        self.assertGreater(gc.get_freeze_count(), 0)


class EdgeCaseTests(TestCase):
    """Bad values that once escaped as a traceback, and precedence between --listen and --port."""

    def test_malformed_public_url_is_a_config_error(self) -> None:
        e = self.assertRaises(ConfigError, build_config, {"public-url": "http://["}, {})
        self.assertIn("--public-url", str(e))

    def test_unknown_endpoint_type_is_a_config_error(self) -> None:
        e = self.assertRaises(ConfigError, build_config, {"listen": "bogus:1"}, {})
        self.assertIn("--listen", str(e))

    def test_port_on_the_command_line_beats_listen_from_the_environment(self) -> None:
        self.assertEqual(build_config({"port": "9000"}, {"HOOKAH_LISTEN": "tcp:7000"}).listen, "tcp:9000")

    def test_zero_retry_step_in_any_spelling(self) -> None:
        self.assertEqual(build_config({"retry-schedule": "0.0,5"}, {}).retry_schedule, (0.0, 5.0))
