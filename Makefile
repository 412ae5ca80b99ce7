# Two entry points, both self-installing and idempotent: `make demo` and `make test`.
#
# The encoder plugins are separate distributions. `make plugins` builds and installs each one
# (a real pip install of plugins/<name>) into its own directory under build/plugin-sites/, never
# into .venv, so tests can put all of them on the path together, or exactly one of them alone.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mmcore-installed
PLUGINS := clip siglip eva02 whisper qwen2vl
SITES   := build/plugin-sites
ALL_SITES := $(subst $(eval) ,:,$(abspath $(addprefix $(SITES)/,$(PLUGINS))))
PLUGIN_SOURCES := $(shell find plugins -name '*.py' -o -name pyproject.toml 2>/dev/null)

.PHONY: demo test test-core test-plugins-alone test-newest install plugins clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

$(SITES)/.stamp: $(STAMP) $(PLUGIN_SOURCES)
	@# Plugins live in their own sites; one left in .venv (an editable dev install) would defeat isolation.
	$(BIN)/python -m pip uninstall --quiet --yes $(addprefix mmcore-plugin-,$(PLUGINS)) 2>/dev/null || true
	for p in $(PLUGINS); do \
	  rm -rf $(SITES)/$$p && \
	  $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --target $(SITES)/$$p ./plugins/$$p || exit 1; \
	  rm -rf plugins/$$p/build plugins/$$p/*.egg-info; \
	done
	touch $@

plugins: $(SITES)/.stamp

demo: plugins
	PYTHONPATH=$(ALL_SITES) $(BIN)/python -m mmcore.demo

# Core and plugin tests with all plugins installed, then each plugin's tests with only itself.
test: test-core test-plugins-alone

test-core: plugins
	PYTHONPATH=$(ALL_SITES) $(BIN)/python -m pytest -n 2 -q tests $(addsuffix /tests,$(addprefix plugins/,$(PLUGINS)))

test-plugins-alone: plugins
	for p in $(PLUGINS); do \
	  echo "== mmcore-plugin-$$p alone"; \
	  PYTHONPATH=$(abspath $(SITES))/$$p MMCORE_STRICT_PLUGINS=1 $(BIN)/python -c \
	    "from mmcore.plugins import plugin_statuses as s; n = sorted(x.name for x in s() if x.name != 'builtin'); assert n == ['$$p'], n" && \
	  PYTHONPATH=$(abspath $(SITES))/$$p MMCORE_STRICT_PLUGINS=1 $(BIN)/python -m pytest -n 2 -q -p no:cacheprovider plugins/$$p/tests || exit 1; \
	done

# The same suite against the newest transformers / peft / timm the registry serves (with whatever they
# pull in), in a second venv; the torch stack stays pinned. Drift shows up here before users meet it.
NEWEST := build/venv-newest
test-newest: plugins
	test -x $(NEWEST)/bin/python || $(PYTHON) -m venv $(NEWEST)
	grep -E '^torch' constraints.txt > build/torch-constraints.txt
	$(NEWEST)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST)/bin/python -m pip install --quiet -c build/torch-constraints.txt -e ".[test]"
	$(NEWEST)/bin/python -m pip install --quiet -c build/torch-constraints.txt --upgrade transformers peft timm
	rm -rf mmcore.egg-info
	$(NEWEST)/bin/python -c "import transformers, peft, timm; print('newest: transformers', transformers.__version__, 'peft', peft.__version__, 'timm', timm.__version__)"
	PYTHONPATH=$(ALL_SITES) $(NEWEST)/bin/python -m pytest -n 2 -q -p no:cacheprovider tests $(addsuffix /tests,$(addprefix plugins/,$(PLUGINS)))

clean:
	rm -rf $(VENV) build .pytest_cache .nox
