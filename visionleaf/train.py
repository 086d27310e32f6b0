"""The main job: ``python -m visionleaf.train --config-name <name>`` trains with verl 0.9.1's V1 trainer.

    python -m visionleaf.train --config-name tiny_cpu                      # CPU, tiny model, ~20 steps
    python -m visionleaf.train --config-name visionleaf_qwen25vl_7b ...    # GPU cluster, the paper's setup
    python -m visionleaf.train --config-name deepeyes_chain ...            # GPU cluster, the chain baseline
    python -m visionleaf.train --config-name deepeyes_chain --cfg job      # print the composed config

See :mod:`visionleaf.verl.train` for what the entry adds to verl's ``main_ppo``.
"""

from visionleaf.verl.train import main

if __name__ == "__main__":
    main()
