"""Ten-class ImageNet subsets used to evaluate GAN-prior distillation (GLaD, H-PD).

Each subset is a list of (WordNet id, class name) in label order: label i is the i-th entry.
The classes and their order are those of the GLaD reference code (its ImageNet-1k class
indices, mapped to WordNet ids through the standard ImageNet-1k index order); ImageNette and
ImageWoof are the fastai subsets (the same ten classes; GLaD's ImageWoof order is kept).
"""

from __future__ import annotations

__all__ = ["IMAGENET_SUBSETS", "SUBSET_ALIASES", "subset_classes"]

IMAGENET_SUBSETS: dict[str, tuple[tuple[str, str], ...]] = {
    "imagenette": (
        ("n01440764", "tench"),
        ("n02102040", "English springer"),
        ("n02979186", "cassette player"),
        ("n03000684", "chain saw"),
        ("n03028079", "church"),
        ("n03394916", "French horn"),
        ("n03417042", "garbage truck"),
        ("n03425413", "gas pump"),
        ("n03445777", "golf ball"),
        ("n03888257", "parachute"),
    ),
    "imagewoof": (
        ("n02096294", "Australian terrier"),
        ("n02093754", "Border terrier"),
        ("n02111889", "Samoyed"),
        ("n02088364", "beagle"),
        ("n02086240", "Shih-Tzu"),
        ("n02089973", "English foxhound"),
        ("n02087394", "Rhodesian ridgeback"),
        ("n02115641", "dingo"),
        ("n02099601", "golden retriever"),
        ("n02105641", "Old English sheepdog"),
    ),
    "imagemeow": (
        ("n02123045", "tabby cat"),
        ("n02123159", "tiger cat"),
        ("n02123394", "Persian cat"),
        ("n02123597", "Siamese cat"),
        ("n02124075", "Egyptian cat"),
        ("n02129165", "lion"),
        ("n02129604", "tiger"),
        ("n02128925", "jaguar"),
        ("n02128757", "snow leopard"),
        ("n02127052", "lynx"),
    ),
    "imagesquawk": (
        ("n01806143", "peacock"),
        ("n02007558", "flamingo"),
        ("n01818515", "macaw"),
        ("n02051845", "pelican"),
        ("n02056570", "king penguin"),
        ("n01614925", "bald eagle"),
        ("n01843383", "toucan"),
        ("n01518878", "ostrich"),
        ("n01860187", "black swan"),
        ("n01819313", "sulphur-crested cockatoo"),
    ),
    "imagefruit": (
        ("n07753275", "pineapple"),
        ("n07753592", "banana"),
        ("n07745940", "strawberry"),
        ("n07747607", "orange"),
        ("n07749582", "lemon"),
        ("n07768694", "pomegranate"),
        ("n07753113", "fig"),
        ("n07720875", "bell pepper"),
        ("n07718472", "cucumber"),
        ("n07742313", "Granny Smith"),
    ),
    "imageyellow": (
        ("n02206856", "bee"),
        ("n12057211", "yellow lady's slipper"),
        ("n07753592", "banana"),
        ("n07749582", "lemon"),
        ("n12144580", "corn"),
        ("n04146614", "school bus"),
        ("n03530642", "honeycomb"),
        ("n02129165", "lion"),
        ("n01773157", "black and gold garden spider"),
        ("n01531178", "goldfinch"),
    ),
    "imagenet-a": (
        ("n02111129", "Leonberg"),
        ("n02489166", "proboscis monkey"),
        ("n11879895", "rapeseed"),
        ("n02457408", "three-toed sloth"),
        ("n03042490", "cliff dwelling"),
        ("n12057211", "yellow lady's slipper"),
        ("n02342885", "hamster"),
        ("n03447447", "gondola"),
        ("n02071294", "killer whale"),
        ("n02013706", "limpkin"),
    ),
    "imagenet-b": (
        ("n02006656", "spoonbill"),
        ("n06359193", "web site"),
        ("n01820546", "lorikeet"),
        ("n02116738", "African hunting dog"),
        ("n13044778", "earthstar"),
        ("n04487081", "trolleybus"),
        ("n01872401", "echidna"),
        ("n02112018", "Pomeranian"),
        ("n03841143", "odometer"),
        ("n02025239", "ruddy turnstone"),
    ),
    "imagenet-c": (
        ("n03393912", "freight car"),
        ("n01833805", "hummingbird"),
        ("n03344393", "fireboat"),
        ("n03208938", "disk brake"),
        ("n01828970", "bee eater"),
        ("n02606052", "rock beauty"),
        ("n02129165", "lion"),
        ("n02017213", "European gallinule"),
        ("n02280649", "cabbage butterfly"),
        ("n01531178", "goldfinch"),
    ),
    "imagenet-d": (
        ("n01518878", "ostrich"),
        ("n02111889", "Samoyed"),
        ("n01534433", "junco"),
        ("n02112706", "Brabancon griffon"),
        ("n01592084", "chickadee"),
        ("n02389026", "sorrel"),
        ("n02276258", "admiral"),
        ("n01622779", "great grey owl"),
        ("n01829413", "hornbill"),
        ("n02277742", "ringlet"),
    ),
    "imagenet-e": (
        ("n04277352", "spindle"),
        ("n01843383", "toucan"),
        ("n01860187", "black swan"),
        ("n02056570", "king penguin"),
        ("n03992509", "potter's wheel"),
        ("n03924679", "photocopier"),
        ("n04153751", "screw"),
        ("n01774750", "tarantula"),
        ("n03857828", "oscilloscope"),
        ("n02281787", "lycaenid butterfly"),
    ),
}

# The names the GLaD / H-PD command lines use ("imagenet-<subset>") for the same subsets.
SUBSET_ALIASES: dict[str, str] = {
    "imagenet-imagenette": "imagenette",
    "imagenet-imagewoof": "imagewoof",
    "imagenet-cats": "imagemeow",
    "imagenet-birds": "imagesquawk",
    "imagenet-fruits": "imagefruit",
    "imagenet-yellow": "imageyellow",
}


def subset_classes(name: str) -> tuple[tuple[str, str], ...]:
    """(WordNet id, class name) pairs of subset ``name`` (or one of its aliases), label order."""
    key = SUBSET_ALIASES.get(name, name)
    if key not in IMAGENET_SUBSETS:
        valid = ", ".join([*IMAGENET_SUBSETS, *SUBSET_ALIASES])
        raise ValueError(f"unknown ImageNet subset {name!r}; valid names: {valid}")
    return IMAGENET_SUBSETS[key]
