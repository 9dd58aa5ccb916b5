"""Batch predictions: a job is a runs row of kind "predict"; its model and input, and the outputs
of its finished chunks

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batch_predictions",
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("model_run_id", sa.Uuid(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=True),
        sa.Column("model_alias", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("input_source", sa.String(length=20), nullable=False),
        sa.Column("input_dataset_id", sa.Uuid(), nullable=True),
        sa.Column("input_filename", sa.String(length=255), nullable=True),
        sa.Column("feature_order", sa.JSON(), nullable=True),
        sa.Column("n_rows", sa.Integer(), nullable=False),
        sa.Column("chunk_rows", sa.Integer(), nullable=False),
        sa.Column("columns", sa.JSON(), nullable=False),
        sa.Column("input_size_bytes", sa.Integer(), nullable=False),
        sa.Column("input_data", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_batch_predictions_run_id_runs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_run_id"], ["runs.id"], name=op.f("fk_batch_predictions_model_run_id_runs")),
        sa.ForeignKeyConstraint(
            ["input_dataset_id"], ["datasets.id"], name=op.f("fk_batch_predictions_input_dataset_id_datasets"),
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_batch_predictions")),
    )
    op.create_index(op.f("ix_batch_predictions_model_run_id"), "batch_predictions", ["model_run_id"], unique=False)
    op.create_table(
        "batch_prediction_chunks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_batch_prediction_chunks_run_id_runs"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_prediction_chunks")),
        sa.UniqueConstraint("run_id", "chunk", name=op.f("uq_batch_prediction_chunks_run_id")),
    )
    op.create_index(op.f("ix_batch_prediction_chunks_run_id"), "batch_prediction_chunks", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_batch_prediction_chunks_run_id"), table_name="batch_prediction_chunks")
    op.drop_table("batch_prediction_chunks")
    op.drop_index(op.f("ix_batch_predictions_model_run_id"), table_name="batch_predictions")
    op.drop_table("batch_predictions")
