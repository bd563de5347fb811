# Production image: the official Airflow image, this package's production requirements installed next to its
# pinned Airflow (the official way: apache-airflow==<the image's version> on the same pip line, so pip cannot move
# Airflow's own dependencies), and the package installed (no sys.path in the DAG or plugin files).
# No test or lint tool, no embedded server: those are requirements-dev.txt's (tests/integration/test_image_contents.py
# builds this file set in a fresh venv from requirements.txt alone and runs a night with it).
# (Astro: the same files work with `FROM astrocrpublic.azurecr.io/runtime:3.x`: README, "Run on Astro".)
ARG AIRFLOW_VERSION=3.3.2
FROM apache/airflow:${AIRFLOW_VERSION}-python3.11
ARG AIRFLOW_VERSION
COPY requirements.txt /requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /requirements.txt
COPY --chown=airflow:root include/ /opt/airflow/include/
RUN pip install --no-cache-dir --no-deps -e /opt/airflow/include
COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
# Airflow settings the package runs with (overnight.dev.devenv.AIRFLOW_SETTINGS says the same for make run and
# make bench; docs/operations.md, "Task slots"): the task supervisor's longest wait between heartbeats, 1 s instead
# of 5, so that a finished task's executor slot is not held up to 5 s more
ENV AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL=1
# Connections and the pseudonym key come from the deployment (a secrets backend or Kubernetes Secrets as
# environment), never from the image (docs/deploy.md):
#   AIRFLOW_CONN_OVERNIGHT_POSTGRES, AIRFLOW_CONN_OVERNIGHT_REDIS, AIRFLOW_VAR_OVERNIGHT_PSEUDONYM_KEY
# Before the new DAGs run: `python -m overnight.adapters.migrate` (the application's migrations, a pre-upgrade
# Job) and `airflow pools import /opt/airflow/include/pools.json` (the scoring pool).
# Auth: investors' data needs the "Overnight recommendations" permission (docs/access.md). Use a real auth
# manager (FAB, Keycloak: AIRFLOW__CORE__AUTH_MANAGER) and grant it to the roles that may read it. Left on this
# image's default, Airflow's stock SimpleAuthManager (which says yes to every viewer), the plugin fails closed:
# personal data for ADMIN and [overnight] personal_data_logins only, and a warning naming the setting.
