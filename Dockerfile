# Production image: the official Airflow image plus this package's pinned requirements and code.
# (Astro: the same files work with `FROM astrocrpublic.azurecr.io/runtime:3.x` instead.)
FROM apache/airflow:3.3.2-python3.11
COPY requirements.txt /requirements.txt
RUN pip install --no-cache-dir -r /requirements.txt
COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
COPY --chown=airflow:root include/ /opt/airflow/include/
ENV PYTHONPATH=/opt/airflow/include
# Connections come from the deployment (secrets backend or environment), never from the image:
#   AIRFLOW_CONN_OVERNIGHT_POSTGRES=postgresql://user:pass@host:5432/overnight
#   AIRFLOW_CONN_OVERNIGHT_REDIS=redis://host:6379/0
# Auth: investors' data needs the "Overnight recommendations" permission (docs/access.md). Use a real auth
# manager (FAB, Keycloak: AIRFLOW__CORE__AUTH_MANAGER) and grant it to the roles that may read it. Left on this
# image's default, Airflow's stock SimpleAuthManager (which says yes to every viewer), the plugin fails closed:
# personal data for ADMIN and [overnight] personal_data_logins only, and a warning naming the setting.
