"""The README's complete example: a typed three-step workflow on a SQLite file.

Run it twice and kill it in between if you like: it picks up where it stopped.

    python examples/quickstart.py
"""

from __future__ import annotations

import asyncio

import msgspec

from reflow_core import Engine, RetryPolicy, StepContext, Workflow


class Signup(msgspec.Struct):
    email: str
    plan: str = "free"


onboarding = Workflow("onboarding", input=Signup)


@onboarding.step
async def create_account(ctx: StepContext[Signup]) -> str:
    return f"acct-{ctx.input.email.split('@')[0]}"


@onboarding.step(retry=RetryPolicy(max_attempts=5, backoff="exponential", initial_delay=0.5))
def send_welcome_email(ctx: StepContext[Signup]) -> dict[str, str]:
    # A plain `def` runs in a worker thread, so blocking I/O is fine here.
    return {"account": ctx.prev, "sent_to": ctx.input.email}


@onboarding.step
async def start_trial(ctx: StepContext[Signup]) -> dict[str, str]:
    account = ctx.steps["create_account"]
    return {"account": account, "plan": ctx.input.plan, "trial": "14 days"}


async def main() -> None:
    async with Engine("sqlite:///onboarding.db", [onboarding]) as engine:
        run = await engine.enqueue(
            onboarding, Signup(email="ada@example.com"), idempotency_key="signup-ada"
        )
        done = await engine.wait_for(run.id, within=30)
        print(done.status.value, done.output)


if __name__ == "__main__":
    asyncio.run(main())
