# Notebook and report tasks. PYTHON defaults to the python on PATH (a venv with `pip install -e ".[notebooks,test]"`).
PYTHON ?= python
PARAMS ?= report

.PHONY: help report report-defaults report-md test-notebooks nbval smoke strip-notebooks

help:
	@echo "make report           execute every notebook with notebooks/params/report/*.yaml -> outputs/ (~40 min, 2 cores)"
	@echo "make report PARAMS=full    the class study's scale (GPUs); PARAMS=defaults: the notebooks' CI-sized defaults"
	@echo "make report-md        rewrite outputs/REPORT.md from outputs/ without executing anything"
	@echo "make test-notebooks   nbval on the stored notebooks + papermill smoke tests (~6 min, 2 cores)"
	@echo "make strip-notebooks  clear notebook outputs before committing (keeps NBVAL_CHECK_OUTPUT cells)"

report:
	$(PYTHON) -m dynbatch_core report --params $(PARAMS)

report-defaults:
	$(PYTHON) -m dynbatch_core report --params defaults --out runs/report-defaults

report-md:
	$(PYTHON) -m dynbatch_core report --no-execute

test-notebooks: nbval smoke

nbval:
	$(PYTHON) -m pytest --nbval-lax notebooks/

smoke:
	$(PYTHON) -m pytest tests/test_notebooks.py

strip-notebooks:
	$(PYTHON) -c "from dynbatch_core.study.report import strip_outputs; print(*strip_outputs(), sep='\n')"
