"""A small WebShop catalogue in WebShop's own file formats, for offline tests and manual runs.

40 products in 8 product families (5 near-competitors each, so searches must rank), written as
``items_shuffle.json`` (scraped-product records), ``items_ins_v2.json`` (annotated attributes) and
``items_human_ins.json`` (human instructions with their attributes and options) — the three files
the environment reads from a WebShop ``data/`` folder. Includes records WebShop itself drops
(asin ``nan``, a repeated asin, an instruction without attributes), a product without a price
(WebShop shows $100.0), price ranges, options written with ``/``, a product too expensive for a
price bound, and goal attributes that are only in a product's text (not its annotations).

Run as a script to write the folder for a manual run::

    python tests/serve/envs/webshop_testshop.py /tmp/webshop_small
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Dict, List, Tuple

FAMILIES: Dict[str, Tuple[str, str, str]] = {  # key -> (query, category, product_category)
    "RUN": ("men's running shoes", "fashion", "Clothing, Shoes & Jewelry › Men › Shoes › Athletic › Running"),
    "SHA": ("sulfate free shampoo", "beauty", "Beauty & Personal Care › Hair Care › Shampoo & Conditioner › Shampoos"),
    "COF": ("whole bean coffee", "grocery", "Grocery & Gourmet Food › Beverages › Coffee, Tea & Cocoa › Coffee › Whole Coffee Beans"),
    "EAR": ("wireless earbuds", "electronics", "Electronics › Headphones, Earbuds & Accessories › Headphones & Earbuds › Earbud Headphones"),
    "CAS": ("iphone 13 case", "electronics", "Cell Phones & Accessories › Cases, Holsters & Sleeves › Basic Cases"),
    "CAN": ("soy candles", "home", "Home & Kitchen › Home Décor Products › Candles & Holders › Candles › Jar Candles"),
    "DOG": ("dry dog food", "pet", "Pet Supplies › Dogs › Food › Dry"),
    "LEG": ("yoga leggings for women", "fashion", "Clothing, Shoes & Jewelry › Women › Clothing › Active › Leggings"),
}

SIZES_M = ["8", "9", "10", "10.5", "11"]
SIZES_W = ["x-small", "small", "medium", "large", "x-large"]

# (family, n, name, pricing, options, attributes, bullets, description, [(instruction, attrs, options)])
PRODUCTS: List[Tuple[Any, ...]] = [
    ("RUN", 1, "Brooks Men's Ghost 14 Neutral Running Shoe", "$89.99 - $129.95",
     {"color": ["Black/Grey", "Blue", "White"], "size": SIZES_M}, ["rubber sole", "lace up", "breathable"],
     ["Rubber sole", "Breathable engineered mesh upper", "DNA LOFT cushioning for a soft ride"],
     "Soft cushioning and a smooth ride. The breathable mesh upper keeps feet cool on long runs.",
     [("i need a pair of men's running shoes with a rubber sole and breathable mesh", ["rubber sole", "breathable mesh"], ["blue", "10"]),
      ("i want neutral running shoes for men, black and grey, size 9", ["neutral running"], ["black | grey", "9"])]),
    ("RUN", 2, "Saucony Men's Kinvara 13 Lightweight Running Shoe", "$99.95",
     {"color": ["Black/White", "Royal Blue", "Green"], "size": SIZES_M}, ["lightweight", "rubber sole"],
     ["Lightweight and flexible", "Rubber sole", "PWRRUN cushioning"], "A fast, light trainer for daily miles.",
     [("i want lightweight men's running shoes with a rubber sole", ["lightweight", "rubber sole"], ["royal blue", "11"])]),
    ("RUN", 3, "ASICS Men's Gel-Venture 8 Trail Running Shoes", "$64.95 - $75.00",
     {"color": ["Graphite Grey", "Black", "Sheet Rock"], "size": SIZES_M}, ["trail", "rubber sole", "gel cushioning"],
     ["Rearfoot GEL technology cushioning", "Trail specific outsole", "Rubber sole"],
     "Rugged trail running shoe with a reversed lug pattern for uphill and downhill traction.",
     [("i'm looking for trail running shoes for men with gel cushioning", ["trail running", "gel cushioning"], ["black", "10.5"])]),
    ("RUN", 4, "New Balance Men's Fresh Foam Arishi V4 Running Shoe", "$54.99 - $79.99",
     {"color": ["Navy/White", "Grey", "Black"], "size": ["8", "8.5", "9", "9.5", "10"]}, ["lace up"],
     ["Memory foam insole", "Lace-up closure", "Fresh Foam midsole"], "Everyday running shoe with a memory foam insole.",
     [("find me men's running shoes with memory foam in navy", ["memory foam"], ["navy | white", "9"])]),
    ("RUN", 5, "Under Armour Men's Charged Assert 9 Running Shoe, Wide", "$70.00",
     {"color": ["Black", "Pitch Gray"], "size": ["9 Wide", "10 Wide", "11 Wide"]}, ["rubber sole", "lace up"],
     ["Wide width fit", "Rubber sole", "Charged Cushioning midsole"], "Lightweight, breathable mesh upper.",
     [("i need wide running shoes for men with a rubber sole, size 11 wide", ["wide width", "rubber sole"], ["11 wide"])]),

    ("SHA", 1, "Pureology Hydrate Sulfate-Free Shampoo for Dry Colored Hair", "$32.00",
     {"size": ["8.5 Fl Oz (Pack of 1)", "33.8 Fl Oz (Pack of 1)"]}, ["sulfate free", "color treated", "dry hair"],
     ["Sulfate free formula", "Moisturizes dry hair", "Vegan"], "A moisturizing shampoo for dry, color-treated hair.",
     [("i need a sulfate free shampoo for dry color treated hair, 33.8 fl oz", ["sulfate free", "dry hair"], ["33.8 fl oz (pack of 1)"])]),
    ("SHA", 2, "OGX Nourishing Coconut Milk Shampoo", "$6.97",
     {"size": ["13 Fl Oz (Pack of 1)", "13 Fl Oz (Pack of 2)", "13 Fl Oz (Pack of 4)"]}, ["coconut", "paraben free"],
     ["Paraben free", "Sulfate free surfactants", "Coconut milk and egg white protein"], "Coconut milk shampoo that adds moisture.",
     [("i'm looking for a paraben free coconut milk shampoo, pack of 2", ["paraben free", "coconut milk"], ["13 fl oz (pack of 2)"])]),
    ("SHA", 3, "Nizoral Anti-Dandruff Shampoo with Ketoconazole", "$15.47", {}, ["dandruff", "itchy scalp"],
     ["Anti-dandruff", "Relieves flaking and itchy scalp"], "Clinically proven dandruff treatment.",
     [("i want an anti dandruff shampoo for itchy scalp", ["itchy scalp"], []),
      ("i need shampoo, anything is fine", [], [])]),  # no attributes: WebShop skips this one
    ("SHA", 4, "Briogeo Scalp Revival Charcoal and Coconut Oil Micro-Exfoliating Shampoo", "$42.00",
     {"size": ["1 Fl Oz", "8 Fl Oz"]}, ["natural ingredients", "dry scalp"],
     ["Binchotan charcoal", "For dry, itchy scalp"], "Made with natural ingredients: charcoal, coconut oil and peppermint.",
     [("i need a charcoal shampoo with natural ingredients for dry scalp", ["natural ingredients", "dry scalp"], ["8 fl oz"])]),
    ("SHA", 5, "Honest Company Gently Nourishing Shampoo and Body Wash for Kids", "$9.99 - $25.99",
     {"scent": ["Sweet Orange Vanilla", "Lavender", "Citrus"]}, ["plant based", "tear free"],
     ["Tear-free", "Plant-based ingredients"], "A tear free 2-in-1 shampoo and body wash.",
     [("looking for a tear free kids shampoo and body wash in lavender", ["tear free"], ["lavender"])]),

    ("COF", 1, "Lavazza Super Crema Whole Bean Coffee Blend, Medium Espresso Roast", "$16.98",
     {"size": ["2.2 Pound (Pack of 1)", "1.1 Pound (Pack of 6)"]}, ["medium roast", "whole bean"],
     ["Medium roast", "Arabica and Robusta"], "Mild and creamy espresso with notes of hazelnut.",
     [("i want whole bean medium roast espresso coffee, 2.2 pound", ["whole bean", "medium roast"], ["2.2 pound (pack of 1)"])]),
    ("COF", 2, "Kicking Horse Coffee, Kick Ass Dark Roast Whole Bean Coffee, Organic", "$11.99 - $42.50",
     {"size": ["10 Ounce", "2.2 Pound"]}, ["dark roast", "usda organic", "fair trade"],
     ["Dark roast", "Fairtrade and organic"], "Smoky, sweet and bold dark roast.",
     [("i need usda organic fair trade dark roast coffee beans", ["usda organic", "fair trade", "dark roast"], ["10 ounce"])]),
    ("COF", 3, "Peet's Coffee Decaf Major Dickason's Blend Coffee", "$9.99",
     {"size": ["12 Ounce (Pack of 1)", "12 Ounce (Pack of 2)"], "style": ["Ground", "Whole Bean"]}, ["decaf", "dark roast"],
     ["Decaf dark roast", "Rich and complex"], "Peet's signature blend, decaffeinated.",
     [("i'd like decaf dark roast coffee, whole bean, 12 ounce pack of 2", ["decaf"], ["whole bean", "12 ounce (pack of 2)"])]),
    ("COF", 4, "Death Wish Coffee Co. Organic Extra Strong Whole Bean Coffee", "$19.99", {}, ["extra strong", "usda organic"],
     ["Extra strong", "USDA organic and fair trade"], "Bold, never bitter.",
     [("i'm looking for an extra strong organic coffee", ["usda organic", "extra strong"], [])]),
    ("COF", 5, "Starbucks Blonde Roast Veranda Blend Whole Bean Coffee, Light Roast", "$7.48 - $38.99",
     {"size": ["12 Ounce (Pack of 1)", "28 Ounce (Pack of 1)"]}, ["light roast", "100% arabica"],
     ["Light roast", "100% arabica beans"], "Mellow and soft with notes of toasted malt.",
     [("i want a light roast 100% arabica whole bean coffee in 28 ounce", ["light roast", "100% arabica"], ["28 ounce (pack of 1)"]),
      ("starbucks veranda blend light roast whole bean coffee 12 ounce", ["light roast", "whole bean"], ["12 ounce (pack of 1)"])]),

    ("EAR", 1, "Soundcore Life P2 True Wireless Earbuds with 4 Microphones", "$39.99",
     {"color": ["Black", "White", "Navy Blue"]}, ["noise cancelling", "bluetooth 5.0", "long battery life"],
     ["cVc 8.0 noise cancelling for calls", "40 hour playtime"], "True wireless earbuds with four microphones.",
     [("i need true wireless earbuds with noise cancelling microphones in navy blue", ["noise cancelling"], ["navy blue"])]),
    ("EAR", 2, "JLab Go Air Sport Wireless Workout Earbuds, Sweat Resistant", "$29.00",
     {"color": ["Black", "Graphite", "Teal"]}, ["sweat resistant", "ear hooks"],
     ["IP55 sweat resistant", "Secure ear hooks"], "Wireless workout earbuds with ear hooks.",
     [("looking for sweat resistant workout earbuds with ear hooks, teal", ["sweat resistant", "ear hooks"], ["teal"])]),
    ("EAR", 3, "Sony WF-1000XM4 Industry Leading Noise Canceling Truly Wireless Earbuds", "$278.00",
     {"color": ["Black", "Silver"]}, ["noise canceling", "wireless charging", "high resolution"],
     ["Industry leading noise canceling", "Qi wireless charging"], "Premium truly wireless earbuds.",
     [("i need noise canceling truly wireless earbuds that support wireless charging, silver", ["noise canceling", "wireless charging"], ["silver"])]),
    ("EAR", 4, "Jabra Elite 3 In Ear Wireless Bluetooth Earbuds", "$49.99 - $79.99",
     {"color": ["Dark Grey", "Lilac", "Light Beige", "Navy"]}, ["bluetooth", "in ear", "water resistant"],
     ["IP55 water resistant", "Bluetooth 5.2"], "Comfortable in ear earbuds.",
     [("i want water resistant bluetooth earbuds in lilac", ["water resistant", "bluetooth"], ["lilac"])]),
    ("EAR", 5, "Bose QuietComfort Earbuds II, Wireless Noise Cancelling", "$299.00",
     {"color": ["Triple Black", "Soapstone"]}, ["noise cancelling", "bluetooth"],
     ["Personalized noise cancelling", "Up to 6 hours of battery"], "Bose's best noise cancelling earbuds.",
     [("i'd like bose noise cancelling earbuds in soapstone", ["noise cancelling"], ["soapstone"])]),

    ("CAS", 1, "Spigen Ultra Hybrid Case for iPhone 13, Crystal Clear", "$15.99",
     {"color": ["Crystal Clear", "Matte Black", "Frost Green"]}, ["shock absorption", "clear"],
     ["Air cushion technology for shock absorption", "Clear back"], "Clear protective case.",
     [("i need a clear shock absorption case for iphone 13", ["shock absorption", "clear"], ["crystal clear"])]),
    ("CAS", 2, "OtterBox Defender Series Rugged Case for iPhone 13", "$39.95 - $59.95",
     {"color": ["Black", "Blueberry", "Purple/Pink"]}, ["heavy duty", "drop protection"],
     ["Heavy duty multi-layer protection", "Drop protection"], "Rugged case with a port cover.",
     [("looking for a heavy duty iphone 13 case with drop protection", ["heavy duty", "drop protection"], ["purple | pink"])]),
    ("CAS", 3, "Silicone Case with MagSafe for iPhone 13, Soft Microfiber Lining", "$12.99",
     {"color": ["Midnight", "Pink Pomelo", "Eucalyptus"]}, ["magsafe compatible", "microfiber lining"],
     ["MagSafe compatible", "Soft microfiber lining"], "Silky silicone exterior.",
     [("i want a silicone magsafe compatible iphone 13 case in eucalyptus", ["magsafe compatible"], ["eucalyptus"])]),
    ("CAS", 4, "Leather Wallet Case for iPhone 13 with Card Holder and Kickstand", "$18.99",
     {"color": ["Brown", "Black", "Wine Red"]}, ["card holder", "kickstand", "pu leather"],
     ["Three card slots", "Kickstand for videos"], "Flip wallet case in PU leather.",
     [("i need an iphone 13 wallet case with card holder and kickstand in brown", ["card holder", "kickstand"], ["brown"])]),
    ("CAS", 5, "Glitter Sparkle Case for iPhone 13 for Women Girls", "$9.99",
     {"color": ["Rose Gold", "Silver", "Purple"]}, ["glitter", "slim fit"],
     ["Slim fit", "Bling glitter back"], "Cute sparkle case.",
     [("find me a slim fit glitter iphone 13 case, rose gold", ["slim fit", "glitter"], ["rose gold"])]),

    ("CAN", 1, "Yankee Candle Large Jar Candle, Balsam & Cedar", "$20.99 - $29.99",
     {"size": ["Large Jar", "Medium Jar", "Tumbler"]}, ["long lasting", "scented"],
     ["Up to 150 hours of burn time", "Long lasting fragrance"], "Fresh balsam fir and cedar.",
     [("i want a long lasting balsam and cedar scented candle in a large jar", ["long lasting"], ["large jar"])]),
    ("CAN", 2, "Soy Wax Scented Candles Gift Set for Women, 4 Pack Aromatherapy", "$25.99",
     {"scent": ["Lavender", "Vanilla", "Eucalyptus Mint"]}, ["soy wax", "gift set"],
     ["Natural soy wax", "Gift set of 4"], "Aromatherapy candles in tins.",
     [("i need a soy wax candle gift set, lavender scent", ["soy wax", "gift set"], ["lavender"]),
      ("looking for aromatherapy soy candles with eucalyptus mint", ["soy wax"], ["eucalyptus mint"])]),
    ("CAN", 3, "Mrs. Meyer's Clean Day Scented Soy Candle, Lemon Verbena", "$9.99", {}, ["soy", "cruelty free"],
     ["Cruelty free", "Soy and vegetable wax"], "Lemon verbena scented soy candle, 35 hour burn time.",
     [("i want a cruelty free lemon verbena soy candle", ["cruelty free"], [])]),
    ("CAN", 4, "Wood Wick Candle in Glass Jar, Crackling Fireplace Sound", "$14.99",
     {"scent": ["Sandalwood", "Black Cherry", "White Tea"]}, ["wood wick", "glass jar"],
     ["Crackling wood wick", "Glass jar"], "Hear the crackle of a fireplace.",
     [("i want a wood wick candle in a glass jar with black cherry scent", ["wood wick", "glass jar"], ["black cherry"])]),
    ("CAN", 5, "Luxury Hand Poured Coconut Wax Candle 3 Wick", "", {"size": ["14 oz", "26 oz"]}, ["coconut wax", "hand poured"],
     ["Hand poured in small batches", "Three cotton wicks"], "Clean burning coconut wax blend.",
     [("i need a hand poured coconut wax 3 wick candle, 26 oz", ["hand poured", "coconut wax"], ["26 oz"])]),

    ("DOG", 1, "Blue Buffalo Life Protection Formula Natural Adult Dry Dog Food, Chicken and Brown Rice", "$29.98 - $64.98",
     {"size": ["6 Pound Bag", "15 Pound Bag", "30 Pound Bag"]}, ["natural", "chicken", "brown rice"],
     ["Real chicken first", "Whole grains and brown rice"], "Natural adult dry dog food with LifeSource Bits.",
     [("i want natural adult dry dog food with chicken and brown rice, 30 pound bag", ["natural", "brown rice"], ["30 pound bag"])]),
    ("DOG", 2, "Purina Pro Plan High Protein Dog Food with Probiotics", "$62.98",
     {"size": ["18 lb. Bag", "35 lb. Bag"]}, ["high protein", "probiotics"],
     ["High protein formula", "Live probiotics for digestive health"], "Shredded blend with real chicken.",
     [("i need high protein dry dog food with probiotics in an 18 lb bag", ["high protein", "probiotics"], ["18 lb. bag"])]),
    ("DOG", 3, "Hill's Science Diet Dry Dog Food, Small Bites", "$18.99",
     {"flavor name": ["Lamb Meal & Brown Rice", "Chicken & Barley"]}, ["small bites", "vet recommended"],
     ["Small kibble", "Vet recommended brand"], "Balanced nutrition for adult dogs.",
     [("i want small bites dry dog food with lamb meal and brown rice", ["small bites"], ["lamb meal & brown rice"])]),
    ("DOG", 4, "Taste of the Wild Grain Free High Protein Dry Dog Food", "$54.99",
     {"flavor name": ["High Prairie", "Pacific Stream", "Southwest Canyon"]}, ["grain free", "high protein"],
     ["Grain free recipe", "Roasted bison and venison"], "High protein recipe with real roasted meat.",
     [("i need grain free high protein dog food, pacific stream flavor", ["grain free", "high protein"], ["pacific stream"])]),
    ("DOG", 5, "Royal Canin Large Breed Puppy Dry Dog Food, Kennel Pack of 24 Bags", "$1,259.76",
     {}, ["large breed", "puppy"], ["For large breed puppies", "Kennel supply pack"], "Bulk supply for breeders.",
     [("i'm looking for large breed puppy dry dog food in bulk", ["large breed", "puppy"], [])]),

    ("LEG", 1, "CRZ YOGA Women's Naked Feeling High Waisted Yoga Leggings 25 Inches", "$28.00",
     {"color": ["Black", "Olive Green", "Royal Blue"], "size": SIZES_W}, ["high waist", "tummy control", "quick drying"],
     ["High waisted with tummy control", "Quick drying fabric"], "Buttery soft yoga leggings, 25 inch inseam.",
     [("i need high waisted yoga leggings with tummy control in olive green, size medium", ["high waist", "tummy control"], ["olive green", "medium"])]),
    ("LEG", 2, "BALEAF Women's Fleece Lined Leggings Winter Thermal Pants", "$22.99 - $28.99",
     {"color": ["Black", "Grey", "Navy"], "size": ["Small", "Medium", "Large"]}, ["fleece lined", "high waist"],
     ["Fleece lined for winter", "High waist"], "Warm thermal leggings for cold weather.",
     [("i want fleece lined winter leggings for women, navy, large", ["fleece lined"], ["navy", "large"])]),
    ("LEG", 3, "Colorfulkoala Women's Buttery Soft High Waisted Yoga Pants with Pockets", "$24.99",
     {"color": ["Heather Grey", "Dark Olive", "Dusty Pink"], "size": SIZES_W}, ["pockets", "high waist"],
     ["Buttery soft", "Side pockets"], "High waisted yoga pants with pockets.",
     [("i need buttery soft yoga pants with pockets in dusty pink, x-small", ["pockets", "buttery soft"], ["dusty pink", "x-small"])]),
    ("LEG", 4, "Champion Women's Authentic Jersey Legging", "$15.00 - $30.00",
     {"color": ["Black", "Oxford Grey"], "size": ["Small", "Medium", "Large", "X-Large", "XX-Large"]}, ["cotton", "machine wash"],
     ["Cotton spandex jersey", "Machine wash"], "Classic jersey legging.",
     [("i want a cotton jersey legging that i can machine wash, oxford grey, xx-large", ["cotton", "machine wash"], ["oxford grey", "xx-large"])]),
    ("LEG", 5, "Lululemon Align High-Rise Pant 28 Inch", "$98.00",
     {"color": ["Black", "Dark Olive", "True Navy"], "size": ["2", "4", "6", "8", "10"]}, ["high rise", "nulu fabric"],
     ["Nulu fabric", "High-rise waistband"], "Weightless feel for yoga.",
     [("i need a high rise lululemon yoga pant in true navy, size 6", ["high rise"], ["true navy", "6"])]),
]


def build() -> Tuple[List[Dict[str, Any]], Dict[str, Any], Dict[str, Any]]:
    """(items_shuffle records, items_ins_v2 attributes, items_human_ins instructions)."""
    items: List[Dict[str, Any]] = []
    attrs: Dict[str, Any] = {}
    human: Dict[str, Any] = {}
    for fam, n, name, pricing, options, attributes, bullets, desc, instructions in PRODUCTS:
        query, category, pcat = FAMILIES[fam]
        asin = f"B0{fam}{n:05d}"
        items.append({
            "asin": asin, "name": name, "category": category, "query": query, "product_category": pcat,
            "full_description": desc, "small_description": bullets, "pricing": pricing,
            "images": [f"https://example.invalid/{asin}.jpg"],
            "customization_options": {k: [{"value": v, "image": None} for v in vals] for k, vals in options.items()},
        })
        if attributes:
            attrs[asin] = {"attributes": attributes}
        human[asin] = [{"instruction": text, "instruction_attributes": a, "instruction_options": o}
                       for text, a, o in instructions]
    # Records WebShop drops: asin 'nan', and a repeat of an asin (the first record wins).
    items.insert(3, dict(items[0], asin="nan", name="Broken Scrape"))
    items.append(dict(items[0], name="Duplicate Brooks Record"))
    return items, attrs, human


def write(folder: pathlib.Path) -> pathlib.Path:
    """Write WebShop's three data files into ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    items, attrs, human = build()
    for name, obj in (("items_shuffle.json", items), ("items_ins_v2.json", attrs), ("items_human_ins.json", human)):
        (folder / name).write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return folder


if __name__ == "__main__":
    print(write(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "webshop_small")))
