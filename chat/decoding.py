"""A request's decoding fields checked against its deployment before anything is queued: a field
its engine cannot honour (llmsite.engine_features) and logit_bias token ids outside the vocabulary
are 400s naming the field."""

from chat.models import Deployment
from chat.prompting import deployment_tokenizer
from llmsite import engine_features
from llmsite.errors import InvalidRequest, concerning

# The contract's field names as the OpenAI API names them.
WIRE_NAMES = {"grammar": "response_format"}


def check_decoding(*, deployment: Deployment, values: dict) -> None:
    """Raise InvalidRequest where `deployment` cannot take the SamplingParams `values`."""
    with concerning(deployment.name):
        unsupported = engine_features.unsupported(deployment.engine, values)
        if unsupported:
            name = WIRE_NAMES.get(unsupported, unsupported)
            raise InvalidRequest(
                f"{name}: the {deployment.engine} engine of the deployment '{deployment.name}' does not support it.", param=name
            )
        if values.get("logit_bias"):
            check_token_ids(deployment, values["logit_bias"])


def check_token_ids(deployment: Deployment, bias: dict) -> None:
    """Token ids over the deployment's vocabulary (where its tokenizer is at hand) are a 400."""
    tokenizer = deployment_tokenizer(deployment)
    if tokenizer is None:
        return  # no worker has published the tokenizer yet: the worker refuses ids outside its vocabulary
    size = len(tokenizer)
    over = sorted((int(k) for k in bias if int(k) >= size))
    if over:
        raise InvalidRequest(
            f"logit_bias: token id {over[0]} is outside the vocabulary of '{deployment.name}' (ids 0..{size - 1}).",
            param="logit_bias",
        )
