# Omega: `make demo` runs the main job on a local cluster; `make test` runs the suite.
# Both install what is missing first (apt packages, .venv, the native build) and
# start libvirtd and virtlogd.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
BUILD   := .build
NATIVE_SRC := $(shell find native -name '*.c' -o -name '*.h' -o -name '*.py' -o -name 'meson.build') meson.build VERSION
PYTEST_ARGS ?=

.PHONY: all setup packages venv native services test demo clean bench

all: setup

setup: packages venv native services

packages:
	@scripts/host-setup.sh packages

services:
	@scripts/host-setup.sh services

venv: $(VENV)/.stamp-deps

$(VENV)/.stamp-deps: pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print('\n'.join(d['dependencies'] + d['optional-dependencies']['test'] \
	  + ['meson>=1.2', 'meson-python>=0.15', 'ninja']))" > $(VENV)/requirements.txt
	$(VPY) -m pip install -q -r $(VENV)/requirements.txt
	@# Development tree on the path; the console script points at it.
	$(VPY) -c "import site; open(site.getsitepackages()[0] + '/omega-dev.pth', 'w').write('$(CURDIR)\n')"
	@printf '#!%s\nimport sys\nfrom hypervisor.cli import main\nsys.exit(main())\n' "$(CURDIR)/$(VPY)" > $(VENV)/bin/omega
	@chmod +x $(VENV)/bin/omega
	@touch $@

native: $(BUILD)/.stamp-native

$(BUILD)/.stamp-native: $(VENV)/.stamp-deps $(NATIVE_SRC)
	@test -f $(BUILD)/build.ninja || $(VENV)/bin/meson setup $(BUILD) --python.install-env=auto -Dpython.bytecompile=-1 >/dev/null
	$(VENV)/bin/meson compile -C $(BUILD)
	@# Replace changed modules by rename, never by rewriting in place: a running
	@# process has the old file mapped and would crash on the new bytes.
	@for so in $$(find $(BUILD)/native -maxdepth 3 -name '*.so'); do \
	  dst=hypervisor/_native/$$(basename $$so); \
	  cmp -s $$so $$dst || { cp -f $$so $$dst.tmp && mv -f $$dst.tmp $$dst; } || exit 1; \
	done
	@touch $@

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/omega demo

bench: setup
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf $(BUILD) hypervisor/_native/*.so
