"""Initial schema: domains, accounts, aliases, app passwords, mailboxes,
messages with shared blobs, expunge tombstones and the outbound queue.

Revision ID: 0001
Revises: none
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Spelled out here rather than imported from models.py: a revision must keep
# creating exactly what it created on the day it was written.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "domains",
        sa.Column("id", Id),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("dkim_selector", sa.String(63), nullable=False),
        sa.Column("dkim_private_key", sa.Text, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_domains"),
        sa.UniqueConstraint("name", name="uq_domains_name"),
    )
    op.create_table(
        "accounts",
        sa.Column("id", Id),
        sa.Column("domain_id", Id, nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("app_passwords_only", sa.Boolean, nullable=False),
        sa.Column("no_backup", sa.Boolean, nullable=False),
        sa.Column("quota_bytes", sa.BigInteger),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("last_uidvalidity", sa.BigInteger, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.ForeignKeyConstraint(["domain_id"], ["domains.id"], name="fk_accounts_domain_id_domains"),
        sa.UniqueConstraint("address", name="uq_accounts_address"),
    )
    op.create_index("ix_accounts_domain_id", "accounts", ["domain_id"])
    op.create_table(
        "aliases",
        sa.Column("id", Id),
        sa.Column("domain_id", Id, nullable=False),
        sa.Column("source", sa.String(320), nullable=False),
        sa.Column("target", sa.String(320), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_aliases"),
        sa.ForeignKeyConstraint(["domain_id"], ["domains.id"], ondelete="CASCADE",
                                name="fk_aliases_domain_id_domains"),
        sa.UniqueConstraint("source", "target", name="uq_aliases_source_target"),
    )
    op.create_index("ix_aliases_domain_id", "aliases", ["domain_id"])
    op.create_index("ix_aliases_target", "aliases", ["target"])
    op.create_table(
        "app_passwords",
        sa.Column("id", Id),
        sa.Column("account_id", Id, nullable=False),
        sa.Column("label", sa.String(100), nullable=False),
        sa.Column("scopes", sa.String(100), nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_app_passwords"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE",
                                name="fk_app_passwords_account_id_accounts"),
        sa.UniqueConstraint("account_id", "label", name="uq_app_passwords_account_id_label"),
    )
    op.create_table(
        "mailboxes",
        sa.Column("id", Id),
        sa.Column("account_id", Id, nullable=False),
        sa.Column("name", sa.String(1000), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger, nullable=False),
        sa.Column("uidnext", sa.BigInteger, nullable=False),
        sa.Column("highestmodseq", sa.BigInteger, nullable=False),
        sa.Column("special_use", sa.String(20)),
        sa.Column("subscribed", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_mailboxes"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE",
                                name="fk_mailboxes_account_id_accounts"),
        sa.UniqueConstraint("account_id", "name", name="uq_mailboxes_account_id_name"),
    )
    op.create_table(
        "blobs",
        sa.Column("id", Id),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("parsed", sa.JSON),
        sa.PrimaryKeyConstraint("id", name="pk_blobs"),
    )
    op.create_table(
        "messages",
        sa.Column("id", Id),
        sa.Column("mailbox_id", Id, nullable=False),
        sa.Column("uid", sa.BigInteger, nullable=False),
        sa.Column("modseq", sa.BigInteger, nullable=False),
        sa.Column("blob_id", Id, nullable=False),
        sa.Column("system_flags", sa.Integer, nullable=False),
        sa.Column("keywords", sa.Text, nullable=False),
        sa.Column("internal_date", Timestamp, nullable=False),
        sa.Column("internal_date_offset", sa.Integer, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.ForeignKeyConstraint(["mailbox_id"], ["mailboxes.id"], ondelete="CASCADE",
                                name="fk_messages_mailbox_id_mailboxes"),
        sa.ForeignKeyConstraint(["blob_id"], ["blobs.id"], name="fk_messages_blob_id_blobs"),
        sa.UniqueConstraint("mailbox_id", "uid", name="uq_messages_mailbox_id_uid"),
    )
    op.create_index("ix_messages_mailbox_id_modseq", "messages", ["mailbox_id", "modseq"])
    op.create_index("ix_messages_blob_id", "messages", ["blob_id"])
    op.create_table(
        "expunged",
        sa.Column("mailbox_id", Id, nullable=False),
        sa.Column("uid", sa.BigInteger, nullable=False),
        sa.Column("modseq", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("mailbox_id", "uid", name="pk_expunged"),
        sa.ForeignKeyConstraint(["mailbox_id"], ["mailboxes.id"], ondelete="CASCADE",
                                name="fk_expunged_mailbox_id_mailboxes"),
    )
    op.create_index("ix_expunged_mailbox_id_modseq", "expunged", ["mailbox_id", "modseq"])
    op.create_table(
        "queue_messages",
        sa.Column("id", Id),
        sa.Column("blob_id", Id, nullable=False),
        sa.Column("sender", sa.String(320), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_queue_messages"),
        sa.ForeignKeyConstraint(["blob_id"], ["blobs.id"], name="fk_queue_messages_blob_id_blobs"),
    )
    op.create_index("ix_queue_messages_blob_id", "queue_messages", ["blob_id"])
    op.create_index("ix_queue_messages_sender", "queue_messages", ["sender"])
    op.create_table(
        "queue_recipients",
        sa.Column("id", Id),
        sa.Column("queue_message_id", Id, nullable=False),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.Column("domain", sa.String(253), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", Timestamp, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("tls_outcome", sa.String(200)),
        sa.Column("lease_owner", sa.String(200)),
        sa.Column("lease_until", Timestamp),
        sa.PrimaryKeyConstraint("id", name="pk_queue_recipients"),
        sa.ForeignKeyConstraint(["queue_message_id"], ["queue_messages.id"], ondelete="CASCADE",
                                name="fk_queue_recipients_queue_message_id_queue_messages"),
    )
    op.create_index("ix_queue_recipients_queue_message_id", "queue_recipients", ["queue_message_id"])
    op.create_index("ix_queue_recipients_status_next_attempt_at", "queue_recipients",
                    ["status", "next_attempt_at"])


def downgrade() -> None:
    for table in ("queue_recipients", "queue_messages", "expunged", "messages", "blobs",
                  "mailboxes", "app_passwords", "aliases", "accounts", "domains"):
        op.drop_table(table)
