-- Extra databases for Prefect and MLflow next to ckreg's own (created by POSTGRES_USER/DB).
CREATE DATABASE prefect OWNER ckreg;
CREATE DATABASE mlflow OWNER ckreg;
