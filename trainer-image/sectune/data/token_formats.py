"""Credential formats that identify themselves: a provider's documented prefix or shape, found
anywhere in free text, with no key naming them (`... rejected credential sk_live_… from …`).

Each entry is (provider, regex). The regexes are written from the formats providers publish for
their tokens (the prefix and the length and alphabet of the random part), anchored on the
prefix so that ordinary words, file hashes and UUIDs never match. Publishable and public keys
(Stripe `pk_`, Mapbox `pk.`, Flutterwave `FLWPUBK`) are left out: they are not secrets, and the
model may need to see them. A credential without a prefix (a bare 32-character hex API key)
cannot be told from a file hash here; `sanitize.py` redacts those only where a key or an
`Authorization:` header names them.
"""

from __future__ import annotations

# fmt: off
TOKEN_FORMATS: list[tuple[str, str]] = [
    ("1password", r"A3-[A-Z0-9]{6}-(?:[A-Z0-9]{11}|[A-Z0-9]{6}-[A-Z0-9]{5})-[A-Z0-9]{5}-[A-Z0-9]{5}-[A-Z0-9]{5}"),
    ("age", r"AGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}"),
    ("alibaba", r"LTAI[A-Za-z0-9]{12,20}"),
    ("anthropic", r"sk-ant-(?:api|admin|sid)\d{2}-[A-Za-z0-9_-]{40,}"),
    ("asana", r"[0-9]/[0-9]{16}:[A-Za-z0-9]{32}"),
    ("atlassian", r"ATATT3[A-Za-z0-9_=-]{50,}"),
    ("aws", r"(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z2-7]{16}"),
    ("aws-bedrock", r"ABSKQmVkcm9ja0FQSUtleS[A-Za-z0-9+/=]{20,}|bedrock-api-key-[A-Za-z0-9+/=]{20,}"),
    ("azure-ad-client-secret", r"[A-Za-z0-9_~.]{3}\dQ~[A-Za-z0-9_~.-]{31,34}"),
    ("bitbucket", r"ATBB[A-Za-z0-9_=.-]{32,}"),
    ("clojars", r"CLOJARS_[a-z0-9]{60}"),
    ("cloudflare-origin-ca", r"v1\.0-[a-f0-9]{24}-[a-f0-9]{146}"),
    ("databricks", r"dapi[a-f0-9]{32}(?:-\d)?"),
    ("definednetworking", r"dnkey-[a-z0-9=_-]{26}-[a-z0-9=_-]{52}"),
    ("digitalocean", r"do[opr]_v1_[a-f0-9]{64}"),
    ("discord-webhook", r"discord(?:app)?\.com/api/webhooks/[0-9]+/[A-Za-z0-9_-]{60,}"),
    ("docker", r"dckr_pat_[A-Za-z0-9_-]{27,}"),
    ("doppler", r"dp\.(?:pt|st|sa|ct|scim|audit)\.[A-Za-z0-9]{40,44}"),
    ("dropbox", r"sl\.[A-Za-z0-9_-]{130,}"),
    ("duffel", r"duffel_(?:test|live)_[A-Za-z0-9_=-]{43}"),
    ("dynatrace", r"dt0c01\.[A-Za-z0-9]{24}\.[A-Za-z0-9]{64}"),
    ("easypost", r"EZ[AT]K[A-Za-z0-9]{54}"),
    ("facebook", r"EAA[A-Za-z0-9]{100,}"),
    ("flutterwave", r"FLWSECK(?:_TEST)?-[a-h0-9]{32}-X|FLWSECK_TEST-?[a-h0-9]{12}"),
    ("flyio", r"fo1_[A-Za-z0-9_-]{43}|fm[12][ar]?_[A-Za-z0-9+/]{100,}={0,3}"),
    ("frameio", r"fio-u-[A-Za-z0-9_=-]{64}"),
    ("gcp-api-key", r"AIza[0-9A-Za-z_-]{35}"),
    ("gcp-oauth-client-secret", r"GOCSPX-[A-Za-z0-9_-]{28}"),
    ("gitlab-session", r"_gitlab_session=[a-z0-9]{32}"),
    ("gitter", r"gs[a-z]_[A-Za-z0-9_-]{36,40}"),
    ("grafana", r"glc_[A-Za-z0-9+/]{32,400}={0,2}|glsa_[A-Za-z0-9]{32}_[A-Fa-f0-9]{8}|eyJrIjoi[A-Za-z0-9]{60,100}={0,2}"),
    ("groq", r"gsk_[A-Za-z0-9]{52}"),
    ("harness", r"(?:pat|sat)\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9]{24}\.[A-Za-z0-9]{20}"),
    ("hashicorp-vault", r"hv[sbr]\.[A-Za-z0-9_-]{24,}"),
    ("heroku", r"HRKU-[A-Za-z0-9_-]{60}"),
    ("huggingface", r"(?:hf_|api_org_)[A-Za-z0-9]{34}"),
    ("infracost", r"ico-[A-Za-z0-9]{32}"),
    ("linear", r"lin_(?:api|oauth)_[A-Za-z0-9]{40}"),
    ("mailgun", r"key-[a-f0-9]{32}"),
    ("newrelic", r"NR(?:AK|JS|II)-[A-Za-z0-9]{19,32}"),
    ("notion", r"(?:secret_|ntn_)[A-Za-z0-9]{43,46}"),
    ("npm", r"npm_[A-Za-z0-9]{36}"),
    ("octopusdeploy", r"API-[A-Z0-9]{26}"),
    ("openai", r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}T3BlbkFJ[A-Za-z0-9_-]{20,}|sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{40,}"),
    ("openshift", r"sha256~[A-Za-z0-9_-]{43}"),
    ("perplexity", r"pplx-[A-Za-z0-9]{48}"),
    ("planetscale", r"pscale_(?:pw|tkn|oauth)_[A-Za-z0-9=._-]{32,64}"),
    ("postman", r"PMAK-[a-f0-9]{24}-[a-f0-9]{34}"),
    ("prefect", r"pnu_[A-Za-z0-9]{36}"),
    ("pulumi", r"pul-[a-f0-9]{40}"),
    ("pypi", r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{16,}"),
    ("readme", r"rdme_[a-z0-9]{70}"),
    ("replicate", r"r8_[A-Za-z0-9]{37}"),
    ("rubygems", r"rubygems_[a-f0-9]{48}"),
    ("scalingo", r"tk-us-[A-Za-z0-9_-]{48}"),
    ("sendgrid", r"SG\.[A-Za-z0-9_-]{20,}(?:\.[A-Za-z0-9_-]{20,})?"),
    ("sendinblue", r"xkeysib-[a-f0-9]{64}-[A-Za-z0-9]{16}"),
    ("sentry", r"sntry[su]_[A-Za-z0-9+/=_-]{60,}"),
    ("settlemint", r"sm_(?:pat|aat|sat)_[A-Za-z0-9]{16}"),
    ("shippo", r"shippo_(?:live|test)_[a-f0-9]{40}"),
    ("shopify", r"shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}"),
    ("slack", r"xox[a-z](?:\.xox[a-z])?-[A-Za-z0-9-]{10,}|xapp-[0-9]-[A-Za-z0-9-]{20,}"),
    ("square", r"sq0(?:atp|csp)-[A-Za-z0-9_^-]{22,43}|EAAA[A-Za-z0-9_-]{60}"),
    ("stripe", r"(?:sk|rk)_(?:live|test|prod)_[A-Za-z0-9]{10,247}|whsec_[A-Za-z0-9]{32,}"),
    ("supabase", r"sbp_[a-f0-9]{40}"),
    ("terraform-cloud", r"[A-Za-z0-9]{14}\.atlasv1\.[A-Za-z0-9_=-]{60,70}"),
    ("twilio", r"SK[0-9a-fA-F]{32}"),
    ("twitter-bearer", r"A{22}(?=[A-Za-z0-9%]*[a-z0-9%])[A-Za-z0-9%]{50,}"),
    ("typeform", r"tfp_[A-Za-z0-9_.=-]{59}"),
    ("xai", r"xai-[A-Za-z0-9]{80}"),
    ("yandex", r"YC[A-Za-z0-9_-]{38}|AQVN[A-Za-z0-9_-]{35,38}|t1\.[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]{86}={0,2}"),
]
# fmt: on

TOKEN_PATTERN = (
    r"(?<![A-Za-z0-9_-])(?:"
    + "|".join(f"(?:{regex})" for _, regex in TOKEN_FORMATS)
    + r")(?![A-Za-z0-9_-])"
)
"""One regex for every format, bounded so that a match is a whole token."""
