# Every target that runs code depends on `install`, so a fresh machine needs nothing else.
VENV := .venv
PY := $(VENV)/bin/python
DEBS := redis-server openssl etcd-server curl chromium prometheus

.PHONY: install lock demo test test-fast lint typecheck pytest check-rules bench bench-quick bench-scale clean fuzz soak

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# The lock: constraints.txt pins every installed distribution (clustercert itself excluded), so
# an install today and in a month resolve the same versions. After adding or bumping a
# dependency in pyproject.toml: `make lock` (installs what pyproject.toml asks for, without the
# old pins, then writes the pins of everything installed), run the tests, commit constraints.txt.
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	{ echo "# Exact versions \`make install\` resolves (pip -c). Regenerate with \`make lock\` after changing"; \
	  echo "# dependencies in pyproject.toml; commit the result."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -i '^clustercert=='; } > constraints.txt
	touch $(VENV)/.installed

demo: install
	$(VENV)/bin/clustercert demo --nodes 3

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

typecheck: install
	$(VENV)/bin/mypy --strict src

# Two workers (pytest-xdist), one test module at a time each: most tests wait on processes, so
# two halve the wall time on 2 cores. The fuzz module runs alone after: schemathesis gives each
# operation's test the same node id, which xdist's scheduling cannot tell apart.
pytest: install
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --ignore tests/control/test_fuzz.py
	$(VENV)/bin/pytest -q tests/control/test_fuzz.py

# The shipped Prometheus alerting rules: syntax (check rules) and behaviour (test rules).
check-rules: install
	promtool check rules deploy/prometheus/clustercert-alerts.yml
	cd deploy/prometheus && promtool test rules clustercert-alerts.test.yml

test: lint typecheck check-rules pytest

# The inner loop: every test that starts no process (control plane, agents, redis, etcd, browser).
test-fast: install
	$(VENV)/bin/pytest -q -m "not cluster"

# Benchmarks (docs/benchmarks.md): they rewrite their own section of that document.
bench: install
	$(PY) -m bench.run

bench-quick: install
	$(PY) -m bench.run --quick

# The control plane with 100, 300 and 1,000 hollow nodes (bench/hollow.py, a load generator).
bench-scale: install
	$(PY) -m bench.scale

# Schemathesis against the API's OpenAPI document on a real cluster, far past the suite's sample.
fuzz: install
	CLUSTERCERT_FUZZ_EXAMPLES=$(or $(FUZZ_EXAMPLES),300) CLUSTERCERT_FUZZ_RANDOM=1 \
		$(VENV)/bin/pytest -q -s -p no:cacheprovider tests/control/test_fuzz.py

# Fault injection, every case SOAK_REPEAT times (docs/reliability.md); figures: build/reliability.json.
soak: install
	mkdir -p build
	CLUSTERCERT_SOAK_REPEAT=$(or $(SOAK_REPEAT),10) CLUSTERCERT_RELIABILITY_OUT=build/reliability.json \
		$(VENV)/bin/pytest -q -p no:cacheprovider --timeout=3600 \
		tests/control/test_recovery.py tests/control/test_recovery_units.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
