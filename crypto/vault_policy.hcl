# Least-privilege Vault/OpenBao policy for the appliance's AppRole.
# Template: {{ transit_mount }}, {{ kek_name }}, {{ signing_key_name }} and {{ owned_key_prefix }} are filled in by
# crypto/vault_setup.py (Python) and by the Ansible role (Jinja2 template module), so both
# install the same text. Anything not listed here is denied (exporting keys, other transit keys,
# creating or deleting keys, sys/, other auth methods).

# Wrap, unwrap and rewrap DEKs with the KEK (update only: no "create", so no key upsert).
path "{{ transit_mount }}/encrypt/{{ kek_name }}" {
  capabilities = ["update"]
}
path "{{ transit_mount }}/decrypt/{{ kek_name }}" {
  capabilities = ["update"]
}
path "{{ transit_mount }}/rewrap/{{ kek_name }}" {
  capabilities = ["update"]
}

# Owner keys, one per subject (the crypto-shred): created by the first wrap (encrypt upsert, hence
# "create"), read and deleted on erasure (config deletion_allowed, then DELETE). Only names under this
# prefix: the KEK and the signing key above can never be deleted with these credentials.
path "{{ transit_mount }}/encrypt/{{ owned_key_prefix }}*" {
  capabilities = ["create", "update"]
}
path "{{ transit_mount }}/decrypt/{{ owned_key_prefix }}*" {
  capabilities = ["update"]
}
path "{{ transit_mount }}/keys/{{ owned_key_prefix }}*" {
  capabilities = ["read", "update", "delete"]
}

# Rotate the KEK and retire old versions (min_decryption_version) during `appliance keys rotate-kek`.
path "{{ transit_mount }}/keys/{{ kek_name }}/rotate" {
  capabilities = ["update"]
}
path "{{ transit_mount }}/keys/{{ kek_name }}/config" {
  capabilities = ["update"]
}

# Read key metadata: KEK versions, and the signing key's public key for auditors.
path "{{ transit_mount }}/keys/{{ kek_name }}" {
  capabilities = ["read"]
}
path "{{ transit_mount }}/keys/{{ signing_key_name }}" {
  capabilities = ["read"]
}

# Sign audit checkpoints and erasure receipts; verify them.
path "{{ transit_mount }}/sign/{{ signing_key_name }}" {
  capabilities = ["update"]
}
path "{{ transit_mount }}/verify/{{ signing_key_name }}" {
  capabilities = ["update"]
}

# Keep the AppRole token alive.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
