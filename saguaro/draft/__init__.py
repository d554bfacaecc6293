"""Where drafts come from: the Draft/DraftStream protocol, model and lookup drafters, cheap drafts."""
